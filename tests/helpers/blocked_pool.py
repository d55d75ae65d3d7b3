"""A command like prepare whose workers never finish: each blocks opening a FIFO nobody writes.

python blocked_pool.py FIFO DST     # writes DST through atomic_path; for kill tests
"""

from __future__ import annotations

import sys

from galaxydist.atomic import atomic_path
from galaxydist.errors import run_cli
from galaxydist.pool import in_order


def read_fifo(path: str) -> str:
    with open(path) as f:
        return f.read()


def main(argv: list[str] | None) -> int:
    fifo, dst = argv or []
    with atomic_path(dst) as tmp:
        tmp.write_text("partial")
        for text in in_order(read_fifo, [(fifo,)] * 4, workers=2):
            tmp.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, sys.argv[1:]))
