"""Atomic writes: a file or folder is either absent, the old one, or complete, never partial.

Everything is written under a temporary name next to its final place and renamed over it
(a rename within one file system is atomic); on any failure, including a full disk or
Ctrl-C, the temporary is removed. Temporary names start with "." and end in ".tmp" (files)
or contain ".tmp-" (folders), so an interrupted run's leftovers are easy to find.

    with atomic_file(path) as tmp:      # PNGs, safetensors caches, manifests
        image.save(tmp, format="PNG")
    atomic_write_bytes(path, data)
    with atomic_directory(folder) as tmp:   # model folders
        pipe.save_pretrained(tmp)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path`; once the block ends it is synced, given the usual permissions
    (mkstemp makes 0600) and renamed to `path`. On any failure it is removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Write into a temporary sibling folder, then rename it over `final` (readers never see a partial one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
