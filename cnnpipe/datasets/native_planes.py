"""`--channels native`: which planes a folder's files carry, and which plane count a store takes.

A native store keeps each file's own planes (five fluorescence channels "S0".."S4",
RGBA, ...), so every row must have the same count. The count is the one most files
have; files with another count are skipped and reported with both counts, never
converted. The planes are read by decoding each file once in the preprocess pool:
the decoder is the only code that knows a format's planes (palette expansion,
extra samples, orientation), so no second header parser can disagree with it.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cnnpipe.datasets.convert import Failure, worker_died
from cnnpipe.datasets.deadlines import die_here_if_asked, start_item
from cnnpipe.datasets.workers import chunks

__all__ = ["PlaneCount", "probe_plane_names", "choose_plane_count", "sort_by_plane_count"]

_CHUNK = 8


def _names_one(path: str, pages: str) -> tuple[str, ...] | Failure:
    """A file's native plane names, or why it cannot be read (naming the file)."""
    from cnnpipe.images.decode import DecodeError, read_image
    from cnnpipe.images.formats import display_path, reason_of

    die_here_if_asked(path)
    try:
        planes = read_image(path, channels="native", alpha="keep", pages=pages)
        return tuple(planes.channels)
    except DecodeError as exc:
        return Failure(str(exc), exc.kind)
    except Exception as exc:  # one file never stops the run: it is reported with its reason
        return Failure(f"{display_path(path)}: {type(exc).__name__}: {reason_of(exc)}", "corrupt")


def _names_items(items: list[tuple[str, str]], timeout: float = 0.0) -> list[tuple[str, ...] | Failure]:
    out: list[tuple[str, ...] | Failure] = []
    for i, (path, pages) in enumerate(items):
        start_item(i, timeout)
        out.append(_names_one(path, pages))
    return out


def probe_plane_names(paths: Sequence[str], engine: Any = None, pages: str = "first", timeout: float = 0.0
                      ) -> list[tuple[str, ...] | Failure]:
    """Each file's plane names (or a `Failure`), in order; decoded by `engine` (`cnnpipe.datasets.engines`;
    None: here), each file within `timeout` seconds in a worker (0: no deadline)."""
    fn, items = functools.partial(_names_items, timeout=timeout), [(p, pages) for p in paths]
    if engine is None:
        return [r for chunk in map(fn, chunks(items, _CHUNK)) for r in chunk]
    return list(engine.map(fn, items, _CHUNK, functools.partial(worker_died, timeout=timeout)))


@dataclass(frozen=True)
class PlaneCount:
    """The plane count a native store takes, the names it records and how many files have them."""

    count: int
    names: tuple[str, ...]
    files: int
    total: int

    def mismatch(self, path: str, names: tuple[str, ...]) -> str:
        """Why a file with other planes is skipped: the expected and the found counts."""
        from cnnpipe.images.formats import display_path

        return (f"{display_path(path)}: {len(names)} plane(s) {'/'.join(names)}; the store takes {self.count} plane(s) "
                f"{'/'.join(self.names)} ({self.files} of {self.total} files have {self.count})")


def choose_plane_count(found: Sequence[tuple[str, ...]]) -> PlaneCount:
    """The count most files have (ties: the count of the earliest such file) and its most common names."""
    if not found:
        raise ValueError("no readable image to take the plane count from")
    counts = Counter(len(n) for n in found)
    first = {}
    for i, n in enumerate(found):
        first.setdefault(len(n), i)
    count = max(counts, key=lambda k: (counts[k], -first[k]))
    names = Counter(n for n in found if len(n) == count).most_common(1)[0][0]
    return PlaneCount(count, names, counts[count], len(found))


def sort_by_plane_count(cands: Sequence[Any], found: Sequence[tuple[str, ...] | Failure]
                        ) -> tuple[list[Any], list[tuple[Any, str, str]], PlaneCount | None]:
    """(files to store, (file, skip kind, reason) of the others, the chosen count or None if none is readable).

    `cands` have a `.path`; `found` is `probe_plane_names` of them: names, or a `Failure`.
    """
    readable = [(c, n) for c, n in zip(cands, found) if not isinstance(n, Failure)]
    dropped = [(c, n.kind, n.message) for c, n in zip(cands, found) if isinstance(n, Failure)]
    if not readable:
        return [], dropped, None
    choice = choose_plane_count([n for _, n in readable])
    keep = [c for c, n in readable if len(n) == choice.count]
    dropped += [(c, "plane_count", choice.mismatch(c.path, n)) for c, n in readable if len(n) != choice.count]
    return keep, dropped, choice
