"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    """The process umask (read once, at import, before any other thread could write files)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _refuse(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def check_can_create(dst: str | os.PathLike) -> None:
    """Fail before a long computation rather than after it: `dst` must not be a folder, and the
    nearest existing folder above it must be one this process may write in. Raises the OSError
    that writing would."""
    dst = Path(dst).absolute()
    if dst.is_dir():
        raise _refuse(errno.EISDIR, dst)
    folder = dst.parent
    while not folder.exists():
        if folder.is_symlink():  # dangling: mkdir would say "File exists"
            raise _refuse(errno.ENOENT, folder)
        folder = folder.parent
    if not folder.is_dir():
        raise _refuse(errno.ENOTDIR, folder)
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise _refuse(errno.EROFS, folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _refuse(errno.EACCES, folder)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds."""
    dst = Path(dst)
    check_can_create(dst)  # "Not a directory: a-file", where mkdir would say "File exists: a-file"
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as err:  # a write error names no file (ENOSPC from write(2), h5py's)
            if err.filename is None:
                err.filename = str(dst)
            raise
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dst)
        directory = os.open(dst.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        tmp_path.unlink(missing_ok=True)
