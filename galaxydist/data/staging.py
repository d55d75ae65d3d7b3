"""Node-local copies of a prepared file (`data.stage`): hundreds of ranks memory-mapping one file
on Lustre/GPFS is what cluster users avoid by copying it to each node's local disk first.

Torch-free and rank-free: the trainer decides which rank copies (the first on each node) and
makes the others wait; this module only knows where a copy goes, how to make one atomically,
and how to tell a good copy (size and the images' checksum recorded in the prepared file).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..atomic import atomic_path
from ..errors import UserError
from .format import PreparedInfo

STAGE_FOLDER = "galaxydist-stage"
CHUNK = 8 * 2**20


def staging_root(setting: str, stage_dir: str | None, env: Mapping[str, str]) -> Path | None:
    """Where node-local copies go, or None for no staging. `auto` stages on SLURM only, into
    $SLURM_TMPDIR, else $TMPDIR, else data.stage_dir, else the system's temporary folder; any
    other value than none/auto is the folder itself."""
    if setting == "none":
        return None
    if setting == "auto":
        if "SLURM_JOB_ID" not in env:
            return None
        return Path(env.get("SLURM_TMPDIR") or env.get("TMPDIR") or stage_dir or tempfile.gettempdir())
    return Path(setting)


def images_checksum(path: str | os.PathLike, offset: int, nbytes: int) -> str:
    """blake2b of the images' bytes in the file (what write_prepared records)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def expected_checksum(info: PreparedInfo) -> str:
    """The recorded checksum, or (a file prepared before it was recorded) the source's own."""
    return info.checksum or images_checksum(info.path, info.offset, info.nbytes)


def staged_path(root: Path, info: PreparedInfo, checksum: str) -> Path:
    return root / STAGE_FOLDER / f"{checksum[:16]}-{Path(info.path).name}"


def is_good_copy(copy: Path, info: PreparedInfo, checksum: str) -> bool:
    return (
        copy.is_file()
        and copy.stat().st_size == os.path.getsize(info.path)
        and images_checksum(copy, info.offset, info.nbytes) == checksum
    )


def make_copy(info: PreparedInfo, copy: Path, checksum: str) -> None:
    """Copy atomically and check the copy before it takes its name; OSError if the disk refuses."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(copy) as tmp:
        shutil.copyfile(info.path, tmp)
        if images_checksum(tmp, info.offset, info.nbytes) != checksum:
            raise UserError(f"{info.path}: the copy in {copy.parent} does not match the file's checksum")
