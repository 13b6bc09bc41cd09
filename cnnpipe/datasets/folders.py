"""Folder scan for `cnnpipe preprocess`: which files are candidates, in which class and split.

Nothing is read here but directory entries. Every entry that cannot become a
candidate (hidden and AppleDouble files, broken links, symlink loops, loose
files beside class folders, unreadable folders) is recorded with a reason, so
the report accounts for every entry. Splits are drawn later, from the files'
paths relative to their class folders (`cnnpipe.datasets.splits`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cnnpipe.datasets.splits import assign_split
from cnnpipe.datasets.store import SPLIT_NAMES
from cnnpipe.images.formats import display_path

__all__ = ["Candidate", "FolderScan", "assign_split", "scan_folder", "skip", "split_order", "walk_files"]


@dataclass(slots=True)  # one per file: keep the per-file bookkeeping small
class Candidate:
    path: str  # absolute path as walked (symlinks kept)
    rel: str  # relative to SRC, posix
    class_rel: str  # relative to the class folder, posix (the split hash key)
    class_name: str
    split: str | None  # the folder's own split in the split layout
    digest: str = ""
    dtype: str = "uint8"  # the sample type its header suggests (preprocess corrects it after decoding)
    group: str | None = None  # a label table's group (patient, slide, scene)
    fold: int = -1  # cross-validation fold (0 to K-1) of a store made with folds, else -1
    target: tuple[float, ...] | None = None  # a multi-label or regression row (cnnpipe.tasks); None: class_name


@dataclass
class FolderScan:
    layout: str  # "classes" or "splits"
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    class_dirs: list[tuple[str, str, str | None]] = field(default_factory=list)  # (rel, class, split)


def skip(scan: FolderScan, rel: str, kind: str, reason: str) -> None:
    """Record an entry that is not stored; `rel` is kept in `display_path` form for the report."""
    scan.skipped.append({"path": display_path(rel), "kind": kind, "reason": reason})


def _skipped_dotfile(scan: FolderScan, entry: os.DirEntry, rel: str) -> bool:
    """Skip (and report) AppleDouble `._*` files and hidden entries; True when skipped."""
    if entry.name.startswith("._"):
        skip(scan, rel, "appledouble", f"{display_path(entry.path)}: AppleDouble metadata file (._*), not an image")
        return True
    if entry.name.startswith("."):
        skip(scan, rel, "hidden", f"{display_path(entry.path)}: hidden {'folder' if entry.is_dir() else 'file'}")
        return True
    return False


def walk_files(root: Path, rel_root: str, scan: FolderScan, visited: set[tuple[int, int]],
                ancestors: tuple[tuple[int, int], ...]) -> Iterator[tuple[str, str]]:
    """Yield (absolute path, path relative to SRC) of regular files under `root`, sorted.

    Follows symbolic links; a directory already seen (a loop, or a second link
    to the same folder) is skipped and reported instead of walked again.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        skip(scan, rel_root, "unreadable", f"{display_path(root)}: cannot list directory: "
                                           f"{exc.strerror or type(exc).__name__}")
        return
    for entry in entries:
        rel = f"{rel_root}/{entry.name}" if rel_root else entry.name
        if _skipped_dotfile(scan, entry, rel):
            continue
        try:
            st = os.stat(entry.path)  # follows symlinks
        except OSError:
            if entry.is_symlink():
                skip(scan, rel, "broken_link", f"{display_path(entry.path)}: broken symbolic link")
            else:
                skip(scan, rel, "unreadable", f"{display_path(entry.path)}: cannot stat file")
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                skip(scan, rel, "symlink_loop", f"{display_path(entry.path)}: symbolic link loop (points to a parent folder)")
                continue
            if key in visited:
                skip(scan, rel, "symlink_repeat", f"{display_path(entry.path)}: folder already scanned through another link")
                continue
            visited.add(key)
            yield from walk_files(Path(entry.path), rel, scan, visited, ancestors + (key,))
        elif stat.S_ISREG(st.st_mode):
            yield entry.path, rel
        else:
            skip(scan, rel, "not_regular", f"{display_path(entry.path)}: not a regular file")


def _subdirs(root: Path) -> list[str]:
    out = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if not e.name.startswith(".") and e.is_dir():  # is_dir follows symlinks
            out.append(e.name)
    return out


def scan_folder(src: Path) -> FolderScan:
    """Find candidate files in SRC/<class>/** or SRC/<split>/<class>/**; nothing is read yet."""
    top = _subdirs(src)
    is_split_layout = bool(top) and set(top) <= set(SPLIT_NAMES)
    scan = FolderScan(layout="splits" if is_split_layout else "classes")
    root_st = os.stat(src)
    visited = {(root_st.st_dev, root_st.st_ino)}
    roots: list[tuple[Path, str, str | None]]  # (folder holding class folders, rel, split)
    if is_split_layout:
        roots = [(src / s, s, s) for s in SPLIT_NAMES if s in top]
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            if not entry.is_dir():
                kind = "appledouble" if entry.name.startswith("._") else (
                    "hidden" if entry.name.startswith(".") else "outside_class")
                skip(scan, entry.name, kind, f"{display_path(entry.path)}: not inside a split/class folder")
    else:
        roots = [(src, "", None)]
    for base, base_rel, split in roots:
        base_st = os.stat(base)
        visited.add((base_st.st_dev, base_st.st_ino))
        ancestors = ((root_st.st_dev, root_st.st_ino), (base_st.st_dev, base_st.st_ino))
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            rel = f"{base_rel}/{entry.name}" if base_rel else entry.name
            if _skipped_dotfile(scan, entry, rel):
                continue
            if not entry.is_dir():
                skip(scan, rel, "outside_class", f"{display_path(entry.path)}: not inside a class folder")
                continue
            st = os.stat(entry.path)
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                skip(scan, rel, "symlink_loop", f"{display_path(entry.path)}: symbolic link loop (points to a parent folder)")
                continue
            visited.add(key)
            # a class name is a label (plots, CSVs, JSON): a folder name that is not UTF-8 gets its
            # display form, the folder itself is still walked by its real path
            class_name = display_path(entry.name)
            scan.class_dirs.append((rel, class_name, split))
            for path, frel in walk_files(Path(entry.path), rel, scan, visited, ancestors + (key,)):
                class_rel = frel[len(rel) + 1:]
                scan.candidates.append(Candidate(path, frel, class_rel, class_name, split))
    return scan


def split_order(scan: FolderScan) -> list[str]:
    """The store's splits in order: those of a train/val/test layout that are present, else all three."""
    if scan.layout == "splits":
        present = {d[2] for d in scan.class_dirs}
        return [s for s in SPLIT_NAMES if s in present]
    return list(SPLIT_NAMES)


