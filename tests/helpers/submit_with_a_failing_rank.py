"""launch/submit.py with rank 1 of the job raising at its 4th step (SLURM_PROCID 1).

python submit_with_a_failing_rank.py SUBMIT_ARGS...

The task class is swapped for a subclass that patches the loss on rank 1 only; submitit's
cloudpickle carries both classes by value into the job (they live in no importable module).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SUBMIT = Path(__file__).resolve().parents[2] / "launch" / "submit.py"
submit = runpy.run_path(str(SUBMIT), run_name="submit_under_test")


class FailingRankTask(submit["TrainTask"]):
    def __call__(self) -> int:
        import os

        import torch
        import torch.nn.functional as F

        if os.environ.get("SLURM_PROCID") == "1":
            original, steps = F.cross_entropy, {"n": 0}

            def failing(*args, **kwargs):
                if torch.is_grad_enabled():
                    steps["n"] += 1
                    if steps["n"] == 4:
                        raise RuntimeError("injected failure on rank 1")
                return original(*args, **kwargs)

            F.cross_entropy = failing
        return super().__call__()


submit["main"].__globals__["TrainTask"] = FailingRankTask  # run_path returned a copy of them
raise SystemExit(submit["run_cli"](submit["main"], sys.argv[1:]))
