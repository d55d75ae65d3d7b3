"""Evaluate the initial model on val and test at any world size; each rank writes what it holds.

torchrun --nproc_per_node=3 eval_ranks.py OUT_DIR train-args...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from galaxydist import distributed
from galaxydist.config import load_config
from galaxydist.engine.builders import build_trainer, check_data

out = Path(sys.argv[1])
cfg = load_config(None, sys.argv[2:])
ctx = distributed.setup(cfg.distributed.timeout_s)
trainer = build_trainer(cfg, ctx, check_data(cfg, ctx))
result = {}
for split in ("val", "test"):
    ev = trainer.evaluate(split)
    result[split] = {"confusion": ev.confusion.tolist(), "loss": ev.loss, "accuracy": ev.accuracy}
(out / f"rank{ctx.rank}_of_{ctx.world_size}.json").write_text(json.dumps(result))
distributed.teardown()
