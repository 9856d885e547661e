"""Run `datalever.train.run` from a JSON config; started by tests with torchrun (one copy per process).

    torchrun --nproc_per_node 2 tests/multiproc/train_run.py CONFIG.json

The config holds TrainConfig fields; `optim` and `lora` are nested dicts; an extra `kill_at_step: K`
makes every process die abruptly (os._exit, no cleanup) right after step K, before that step's
checkpoint, as a crashed job would; `eval_at_step: K` with `eval_data: FILE` evaluates the live model
after step K (`evaluate.evaluate_during_training`, as the experiment's learning curves do; `eval_options`:
the fields of its GenerationOptions). Each process writes `CONFIG.json.rank<R>.json` = {"rank", "world_size",
"summary", "eval"} at the end (a file, not stdout: the processes share one stdout and their lines may
interleave).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(path: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datalever.optim import OptimConfig
    from datalever.train import LoraConfig, TrainConfig, run

    values = json.loads(open(path).read())
    values["optim"] = OptimConfig(**values.get("optim", {}))
    values["lora"] = LoraConfig(**values.get("lora", {}))
    kill_at = values.pop("kill_at_step", None)
    eval_at, eval_data, eval_options = (
        values.pop("eval_at_step", None),
        values.pop("eval_data", None),
        values.pop("eval_options", {}),
    )
    evaluated = {}

    def on_step(step, record, model, accelerator):
        if step == kill_at:
            os._exit(17)
        if step == eval_at:
            from datalever.evaluate import evaluate_during_training
            from datalever.examples import load_examples
            from datalever.generation import GenerationOptions
            from datalever.models import load_tokenizer, resolve_model

            tokenizer = load_tokenizer(resolve_model(values["model"], seed=values.get("seed", 0)))
            metrics, records = evaluate_during_training(
                model,
                accelerator,
                tokenizer,
                load_examples(eval_data),
                GenerationOptions(progress=False, **eval_options),
            )
            evaluated.update(accuracy=metrics["accuracy"], generations={r["id"]: r["generation"] for r in records})

    summary = run(TrainConfig(**values), on_step=on_step)
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{path}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world_size": summary["world_size"], "summary": summary, "eval": evaluated}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # explicit: gloo torn down at interpreter exit can abort
    sys.stdout.flush()
    os._exit(0)  # and skip the interpreter's teardown, where gloo's threads can still abort on a loaded machine


if __name__ == "__main__":
    main(sys.argv[1])
