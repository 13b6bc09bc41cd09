"""Files every stage writes: atomic writes (a temporary sibling, then a rename) and the cache root."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_atomic", "default_cache_dir"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block succeeds.

    Readers see the old file or the complete new one, never a half-written one; a
    failed write removes the temporary file. The suffix is kept, so writers that pick
    a format from the name (matplotlib) still do.

    Example:
      with atomic_path(run_dir / "loss.png") as tmp:
          fig.savefig(tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_path` (never half-written)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def default_cache_dir() -> Path:
    """~/.cache/cnnpipe, or $XDG_CACHE_HOME/cnnpipe: the folder/tfds store caches and the compile cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnpipe"
