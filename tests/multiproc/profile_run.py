"""torchrun helper: `torchrun --nproc_per_node N tests/multiproc/profile_run.py '{"run_dir": ..., ...}'`.

Runs `datalever.profile.run` on CPU (gloo) with the ProfileConfig fields given as JSON.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)

from accelerate import PartialState  # noqa: E402

from datalever.optim import OptimConfig  # noqa: E402
from datalever.profile import ProfileConfig, run  # noqa: E402

PartialState(cpu=True)  # multi-process CPU: gloo; Accelerator() in the proxy's train loop reuses this state
settings = json.loads(sys.argv[1])
if "optim" in settings:  # a nested config, given as its fields
    settings["optim"] = OptimConfig(**settings["optim"])
meta = run(ProfileConfig(**settings))
if PartialState().is_main_process:
    print(json.dumps({"steps": meta["steps"], "complete": meta["complete"]}))
PartialState().wait_for_everyone()
torch.distributed.destroy_process_group()  # explicit: gloo torn down at interpreter exit can abort
sys.stdout.flush()
os._exit(0)  # and skip the interpreter's teardown, where gloo's threads can still abort on a loaded machine
