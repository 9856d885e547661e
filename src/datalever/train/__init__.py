"""Fine-tune a causal LM on prompt/response examples with the loss on response tokens only (AdamW, Muon or SAM; full
or LoRA), on a CPU, one GPU, or many processes through Accelerate (DDP, FSDP2).

The rooms:

    config.py       TrainConfig and LoraConfig; which settings decide the numbers (the resume identity)
    inputs.py       the options checked, the examples and multiplicities read, the identity computed
    outputs.py      what train writes in `out`, and whether a run there is this run (resume, return, refuse, replace)
    loop.py         the recipe: setup -> loop -> finish (`run`)
    order.py        the seeded order of the examples, epoch after epoch, and the run's length in steps
    checkpoint.py   save, load, prune, RNG, FSDP gathering, temporaries, the save timer, the final model's weights
    logs.py         the JSONL log and the trackers

`datalever train` is `run(TrainConfig(...))`.
"""

from datalever.train.config import LoraConfig, TrainConfig
from datalever.train.loop import run
from datalever.train.order import total_steps

__all__ = ["LoraConfig", "TrainConfig", "run", "total_steps"]
