"""Train the galaxy CNN, on one process or many.

    torchrun --nproc_per_node=4 -m galaxydist.train --config configs/galaxy10.yaml [key=value ...]
    python -m galaxydist.train ...                      # the same run as one process

Re-running with the same output_dir resumes from checkpoints/last.pt. SIGTERM or SIGUSR2 (SLURM
preemption, submitit's time-limit warning) finishes the current step on every rank, writes
last.pt and exits with EXIT_INTERRUPTED.
"""

from __future__ import annotations

import argparse
import signal
import sys

from . import distributed
from .allocator import keep_freed_memory
from .config import load_config
from .engine.builders import (
    build_run_model,
    build_trainer,
    check_data,
    cuda_graphs_possible,
    prepare_run_folder,
    stage_data,
)
from .engine.state import load_resume_state
from .engine.trainer import Interrupted, NonFiniteLoss, request_stop
from .errors import IO_ERROR, UserError, run_cli

EXIT_NONFINITE = 3
EXIT_CANNOT_WRITE = IO_ERROR  # 74: rank 0 could not write to the run folder; the checkpoints written stay
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving last.pt; run again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m galaxydist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (default: the packaged configs/galaxy10.yaml)")
    parser.add_argument(
        "--resume", help="checkpoint to resume from (default: output_dir/checkpoints/last.pt)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. stages.0.lr=5e-4 data.batch_size=128"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
    ctx = distributed.setup(cfg.distributed.timeout_s)
    together = False  # a crash on one rank: leave without waiting for the others
    try:
        # Every rank reads the same files, so a bad input fails on all of them alike, before any write.
        info = check_data(cfg, ctx, stage_data(cfg, ctx))
        cuda_graphs_possible(cfg, ctx)  # an impossible speed setting fails here, before any write
        model, pretrained = build_run_model(cfg, info)
        resume = load_resume_state(cfg, info, args.resume)
        prepare_run_folder(cfg, ctx, info, resume[0] if resume else None)
        if pretrained and ctx.is_main and not resume:
            print(pretrained.line(), flush=True)
        build_trainer(cfg, ctx, info, model).fit(resume)
        together = True
        return 0
    except Interrupted as err:
        together = True
        print(
            f"rank {ctx.rank}: stopped by signal at {err}; last.pt saved, run again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except NonFiniteLoss as err:
        together = True
        print(f"rank {ctx.rank}: {err}; stopping (last good checkpoint kept)", file=sys.stderr)
        return EXIT_NONFINITE
    except distributed.CannotWrite as err:
        together = True
        print(f"rank {ctx.rank}: rank 0 {err}; stopping", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except UserError:
        together = True  # bad input is seen alike by every rank
        raise
    finally:
        distributed.teardown(together)
        for s, handler in previous.items():
            signal.signal(s, handler)


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
