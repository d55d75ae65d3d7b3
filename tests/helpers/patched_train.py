"""Run galaxydist.train with one fault patched into ONE rank, to test what the other ranks do.

python patched_train.py nan RANK STEP -- train args...     # rank RANK's loss is NaN at step STEP
python patched_train.py stop RANK EPOCH -- train args...   # only rank RANK wants to stop early
python patched_train.py raise RANK STEP -- train args...   # rank RANK raises at step STEP
python patched_train.py hang RANK STEP -- train args...    # rank RANK blocks (alive) at step STEP
"""

from __future__ import annotations

import os
import sys
import threading

import torch
import torch.nn.functional as F

from galaxydist import train
from galaxydist.engine import state
from galaxydist.errors import run_cli

fault, fault_rank, at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = sys.argv[sys.argv.index("--") + 1 :]
rank = int(os.environ.get("RANK", 0))

if rank == fault_rank and fault in ("nan", "raise", "hang"):
    original = F.cross_entropy
    steps = {"n": 0}

    def faulty_cross_entropy(*a, **k):
        loss = original(*a, **k)
        if torch.is_grad_enabled():
            steps["n"] += 1
            if steps["n"] == at + 1:
                if fault == "raise":
                    raise RuntimeError(f"injected failure on rank {rank}")
                if fault == "hang":
                    print(f"rank {rank} hangs at step {at}", file=sys.stderr, flush=True)
                    threading.Event().wait()  # alive, out of every collective, until killed
                return loss * float("nan")
        return loss

    F.cross_entropy = faulty_cross_entropy

if rank == fault_rank and fault == "stop":
    validations = {"n": 0}
    original_update = state.EarlyStopping.update

    def update(self, score):
        validations["n"] += 1
        original_update(self, score)
        if validations["n"] >= at:
            self.bad_epochs = self.patience  # this rank alone wants to stop
        return False

    state.EarlyStopping.update = update

raise SystemExit(run_cli(train.main, args))
