"""Image folder -> dataset store: probe, stable split, parallel prepare, stream to the store, report.

Two passes over the files:

1. *probe*, in this process while the worker pool starts: read the first
   bytes of each file, recognise it by magic bytes, note its bit depth from
   the header. This fixes the store's dtype (uint16 as soon as one file is
   16-bit) and the classes before anything is written.
2. *prepare*, in worker processes (`cnnpipe.datasets.convert`): read each file
   once, hash its bytes (for the duplicate report) and run the one image path,
   `cnnpipe.images.transform.prepare_bytes` (decode -> match planes -> promote ->
   resize), the very chain `cnnpipe predict` uses; rows stream to the store's
   .npy files, so memory does not grow with the number of images.

One bad file never stops a run: whatever goes wrong reading, decoding or
transforming it (any exception, or a worker process dying on it twice) skips it
with its kind and reason in `report.json`. The store's dtype is that of the
images actually stored: a header that promised 16 bits on a file later skipped
never makes an 8-bit store uint16.
Only a problem with the output (OUT unwritable, disk full) stops the run,
and then nothing is left behind (`cnnpipe.datasets.store.StoreWriter`).

The folder scan is `cnnpipe.datasets.folders`, the pool `cnnpipe.datasets.workers`, the report
`cnnpipe.datasets.report`. Worker processes import this module and the image
path (numpy, Pillow, imagecodecs), never jax.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.datasets.accumulator import Accumulator
from cnnpipe.datasets.convert import (
    DEFAULT_FILE_TIMEOUT,
    Failure,
    NeedsDtype,
    Prepared,
    convert_items,
    probe_file,
    worker_died,
)
from cnnpipe.datasets.engines import Engine, engine_started_early
from cnnpipe.datasets.folders import Candidate, FolderScan, scan_folder, skip, split_order
from cnnpipe.datasets.native_planes import PlaneCount, probe_plane_names, sort_by_plane_count
from cnnpipe.datasets.preprocess_settings import PreprocessError, Settings, check_paths, parse_size
from cnnpipe.datasets.progress import Progress
from cnnpipe.datasets.report import build_report, reason_counts
from cnnpipe.datasets.store import SPLIT_NAMES, Store, StoreWriter, build_meta, check_output, exact_mean_std, load_store
from cnnpipe.datasets.table_scan import LabelTable, scan_table
from cnnpipe.datasets.tables import find_metadata
from cnnpipe.datasets.task_targets import folds_for_task, set_strata, split_for_task, task_of
from cnnpipe.datasets.workers import chunks
from cnnpipe.images.formats import display_path
from cnnpipe.images.pixel_types import is_float_file, store_dtype_for, widen
from cnnpipe.images.transform import IMAGE_PATH_VERSION, ImageSpec
from cnnpipe.tasks import Task

__all__ = ["PreprocessError", "Settings", "preprocess", "parse_size"]

log = logging.getLogger(__name__)

_PROBE_CHUNK = 64
_CONVERT_CHUNK = 8


def preprocess(src: str | os.PathLike, out: str | os.PathLike, *, size: int | str | Sequence[int],
               resize: str = "crop", val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0,
               workers: int | None = None, channels: str = "rgb", overwrite: bool = False,
               progress: bool | None = None, pages: str = "first", labels: str | os.PathLike | LabelTable | None = None,
               split: str | None = None, folds: int | None = None, dtype: str | None = None,
               file_timeout: float = DEFAULT_FILE_TIMEOUT, engine: str = "local", scheduler: str | None = None,
               scheduler_file: str | os.PathLike | None = None) -> Store:
    """Decode an image folder once into a dataset store at `out` and return it.

    Args:
      src: SRC/<class>/**/<image>, or SRC/<split>/<class>/**/<image> with split
        folders train/val/test (then the folder's own split is kept and the
        fractions are ignored).
      out: the store directory; must not exist unless `overwrite`.
      size: target H or (H, W) / "HxW".
      resize: "crop" (cover, centre crop), "pad" (fit, zero padding) or "stretch".
      val_fraction, test_fraction: share of each class assigned to val/test (`split`).
      seed: split seed.
      labels: a label table (CSV, TSV, JSON Lines, Parquet: `cnnpipe.datasets.tables`) naming each
        image's class, a path or a `LabelTable` with its columns; SRC is then any folder of images.
        None: class folders, or SRC's Hugging Face metadata.csv|jsonl|parquet (a `file_name` column).
      split: "stratified", "group" or "hash" (`cnnpipe.datasets.splits`); None: "group" with a group
        column, else "stratified". A train/val/test layout or a split column is kept as given.
      folds: K-fold cross-validation: the non-test files dealt into K folds (stratified, grouped with
        a group column), recorded in train/folds.npy; `data.fold` then picks the validation fold.
      workers: decoding processes; None or 0 = every core, 1 = in this process.
      channels: "rgb" (3 planes), "gray" (1 luma plane) or "native" (each file's own planes,
        e.g. five fluorescence channels; the count most files have, the others skipped and
        reported with both counts; the plane names are recorded in meta.json).
      overwrite: replace an existing store at `out` (only once the new one is complete).
      pages: multi-page TIFFs: "first" (page 1, noted in the report's warnings) or "planes"
        (every page a plane; see `cnnpipe.images.decode.read_image`).
      progress: show a progress bar; None = only on an interactive terminal.
      dtype: None: the store's pixel type is the narrowest holding every stored file exactly
        (`cnnpipe.images.pixel_types`); a folder mixing integer and float files is refused.
        "float32": every file's values as they are (no x257), nodata as NaN.
      file_timeout: seconds a worker process may spend on one file (0: no deadline); a file past it
        is stopped (its process replaced) and reported with kind "timeout". With `workers` 1 files
        are prepared in this process, where a deadline cannot be enforced.
      engine: "local" (this machine's worker pool) or "dask" (`cnnpipe.datasets.dask_engine`: a Dask
        cluster; the same store, byte for byte). `scheduler` (an address, "tcp://host:8786") or
        `scheduler_file` (written by `dask scheduler --scheduler-file`) names the cluster; neither:
        a local cluster of `workers` worker threads. OUT's folder must be on a filesystem every worker sees.

    Returns:
      The written `Store`. Files that could not be used are in its report, each with a reason.

    Raises:
      PreprocessError (a ValueError): SRC missing, no images, fewer than two
        classes, a class without a single usable image, bad settings; TableError (a ValueError):
        a label table that cannot be used (naming it and the row or column); SplitError (a
        ValueError): more folds than a class has images or than there are groups.
      OSError: the output cannot be written (the error names the path); nothing is left behind.
    """
    if workers is not None and int(workers) < 0:
        raise PreprocessError(f"workers: expected a positive number (or 0 for every core), got {workers!r}")
    src_p, out_p = Path(src), Path(out)
    if labels is None and src_p.is_dir() and (found := find_metadata(src_p)) is not None:
        labels = found  # the Hugging Face imagefolder convention
    table = labels if isinstance(labels, LabelTable) or labels is None else LabelTable(os.fspath(labels))
    settings = Settings(parse_size(size), resize, channels, val_fraction, test_fraction, seed,
                        int(workers) if workers else (os.cpu_count() or 1), overwrite,
                        sys.stderr.isatty() if progress is None else bool(progress), pages, table, split, folds,
                        dtype, file_timeout, engine, scheduler, None if scheduler_file is None else os.fspath(scheduler_file))
    settings.check()
    check_paths(src_p, out_p)
    check_output(out_p.absolute(), overwrite)
    scan, table_record = _scan(src_p, table)
    with engine_started_early(engine, settings.workers, len(scan.candidates), out_p, scheduler=scheduler,
                              scheduler_file=settings.scheduler_file) as started:
        build = _Build(scan, settings, src_p, out_p, table=table_record)
        build.probe()
        build.engine = started()
        if settings.channels == "native":
            build.probe_planes()
        build.assign_splits()
        build.confirm_dtype()
        return build.write_wide_enough()


def _scan(src: Path, table: LabelTable | None) -> tuple[FolderScan, dict[str, Any] | None]:
    """The candidates of class folders or of a label table (and the table's record); PreprocessError if none."""
    scan, record = scan_table(src, table) if table is not None else (scan_folder(src), None)
    if not scan.candidates:
        where = (f"no usable row in {display_path(table.path)} (images under {src})" if table is not None
                 else f"no image files found in {src} (expected SRC/<class>/<image> or "
                      "SRC/<train|val|test>/<class>/<image>")
        raise PreprocessError(f"SRC: {where}; {len(scan.skipped)} entries skipped ({reason_counts(scan.skipped)})")
    return scan, record


class _NeedsDtype(Exception):
    """A file whose values the store's type cannot hold (its header suggested a narrower type)."""

    def __init__(self, result: NeedsDtype) -> None:
        super().__init__(result.message)
        self.dtype, self.message = result.dtype, result.message


@dataclass
class _Build:
    """One preprocess run: the scan, the usable files and what has been stored so far."""

    scan: FolderScan
    settings: Settings
    src: Path
    out: Path
    engine: Engine | None = None
    ok: list[Candidate] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    dtype: str = "uint8"
    planes: PlaneCount | None = None  # a native store's plane count and names
    table: dict[str, Any] | None = None  # the label table's record (meta.json "labels")
    method: str = "stratified"  # how the files were split (meta.json "split")
    folds: int | None = None
    task: Task = field(default_factory=Task)  # a label table's multi-label or regression task
    timed_out: dict[str, Failure] = field(default_factory=dict)  # path -> its timeout, from any pass

    def _prepared(self, items: list[tuple[str, bool, ImageSpec]], job_size: int = _CONVERT_CHUNK) -> Iterator[Any]:
        """Each (path, want_stats, spec) item prepared by the engine, each file within --file-timeout in a
        worker process: its `Prepared`, `Failure` or `NeedsDtype`, in order. A timed-out file is not
        prepared again by a later pass (store type, write): one hang costs one deadline."""
        timeout = self.settings.file_timeout
        results = self.engine.map(functools.partial(convert_items, timeout=timeout), items, job_size,
                                  functools.partial(worker_died, timeout=timeout))
        try:
            for item, r in zip(items, results):
                if isinstance(r, Failure) and r.kind == "timeout":
                    self.timed_out[item[0]] = r
                yield r
        finally:
            results.close()

    def probe(self) -> None:
        """Pass 1: keep files whose first bytes are an image; fix classes, splits and dtype."""
        scan, s = self.scan, self.settings
        bar = Progress(s.progress, len(scan.candidates), "scanning")
        for chunk in chunks(scan.candidates, _PROBE_CHUNK):
            bad = 0
            for cand in chunk:
                failure, cand.dtype = probe_file(cand.path)
                if failure is None:
                    self.ok.append(cand)
                else:
                    bad += 1
                    skip(scan, cand.rel, failure.kind, failure.message)
            bar.update(len(chunk), bad)
        bar.close()
        self.task = task_of(self.table)
        self.classes = sorted({c.class_name for c in self.ok}) if self.task.is_classification else \
            list(self.task.names) * bool(self.ok)
        if not self.classes:
            raise PreprocessError(f"SRC: no images in {self.src}: {len(scan.candidates)} files, none a "
                                  f"recognised image ({reason_counts(scan.skipped)})")
        set_strata(self.ok, self.task)   # multi-label and regression files: their split strata
        if len(self.classes) < 2 and self.task.is_classification:
            raise PreprocessError(f"SRC: only one class ({self.classes[0]!r}) in {self.src}; a classifier "
                                  f"needs at least two {'labels' if self.table else 'class folders'}")

    def assign_splits(self) -> None:
        """Each usable file's split and fold: as a train/val/test layout or a split or fold column gives
        them, else by the split method (`cnnpipe.datasets.splits`); with folds, non-test files are "train"."""
        s, ok = self.settings, self.ok
        groups = [c.group or "" for c in ok] if any(c.group is not None for c in ok) else None
        if any(c.fold >= 0 for c in ok):   # a fold column
            self.method, self.folds = "column", 1 + max(c.fold for c in ok)
            if s.folds and s.folds != self.folds:
                raise PreprocessError(f"folds: {s.folds} asked for, but the fold column holds {self.folds} folds")
            for c in ok:
                c.split = "test" if c.split == "test" else "train"
            return
        self.method = s.method()
        todo = [c for c in ok if c.split is None]
        if len(todo) < len(ok):   # a train/val/test layout or a split column; files outside it split as asked
            given_by = "column" if s.labels is not None and s.labels.split_col is not None else "folders"
            self.method = given_by if not todo else f"{given_by}+{self.method}"
        if todo:   # by class, by label sets (multi-label) or by quantile bin (regression)
            splits = split_for_task(self.task, todo, method=s.method(), val_fraction=s.val_fraction,
                                    test_fraction=s.test_fraction, seed=s.seed, grouped=groups is not None)
            for c, split in zip(todo, splits):
                c.split = split
        if s.folds:   # every non-test file into a fold, given splits included
            splits, folds = folds_for_task(self.task, ok, s.folds, s.seed, groups is not None)
            for c, split, f in zip(ok, splits, folds.tolist()):
                c.split, c.fold = split, f
            self.folds = s.folds

    def probe_planes(self) -> None:
        """`--channels native`: the plane count most files have; skip (and report) the others."""
        found = probe_plane_names([c.path for c in self.ok], self.engine, self.settings.pages,
                                  self.settings.file_timeout)
        keep, dropped, self.planes = sort_by_plane_count(self.ok, found)
        for cand, kind, reason in dropped:
            skip(self.scan, cand.rel, kind, reason)
        if self.planes is None:
            raise PreprocessError(f"SRC: no image in {self.src} could be decoded "
                                  f"({reason_counts(self.scan.skipped)})")
        self.ok = keep

    def confirm_dtype(self) -> None:
        """The store's pixel type: the narrowest holding every file (`cnnpipe.images.pixel_types`).

        Headers are a guess: a float or damaged file may claim 16 bits and then be skipped,
        and must not make an 8-bit store uint16 (x257). So the files whose headers ask for
        more than uint8 are prepared in order, for a uint8 store, until the store type they
        need reaches what the headers promise; a file that later needs more (a header said
        8 bits, an int16 file needing resampling) restarts the write with a wider store
        (`_NeedsDtype`). Integer files beside float files are refused unless `--dtype float32`.

        Raises:
          PreprocessError: a folder mixing integer and float files, naming one of each.
        """
        s = self.settings
        self.dtype = s.dtype or "uint8"
        if s.dtype:
            return
        floats = self._first_readable([c for c in self.ok if is_float_file(c.dtype)])
        ints = self._first_readable([c for c in self.ok if not is_float_file(c.dtype)]) if floats else None
        if floats is not None and ints is not None:
            raise PreprocessError(f"SRC mixes integer and float images ({display_path(ints.rel)} is {ints.dtype}, "
                                  f"{display_path(floats.rel)} is {floats.dtype}): preprocess --dtype float32 (or "
                                  "data.dtype: float32, --set data.dtype=float32) keeps every file's values as they "
                                  "are in a float32 store; or convert one kind")
        promised = "uint8"
        for c in self.ok:
            promised = widen(promised, store_dtype_for(c.dtype))
        maybe = [c for c in self.ok if c.dtype != "uint8" and c.path not in self.timed_out]
        if not maybe:
            return
        spec = s.spec("uint8", self.planes.count if self.planes else None)
        results = self._prepared([(c.path, False, spec) for c in maybe], 2)
        try:
            for r in results:
                if isinstance(r, NeedsDtype):
                    self.dtype = widen(self.dtype, r.dtype)
                if widen(self.dtype, promised) == self.dtype:
                    return
        finally:
            results.close()

    def _first_readable(self, cands: list[Candidate]) -> Candidate | None:
        """The first of `cands` that decodes (a broken file's header decides nothing), or None."""
        if not cands:
            return None
        spec = self.settings.spec("float32", self.planes.count if self.planes else None)   # takes any type
        cands = [c for c in cands if c.path not in self.timed_out]
        results = self._prepared([(c.path, False, spec) for c in cands], 2)
        try:
            return next((c for c, r in zip(cands, results) if not isinstance(r, Failure)), None)
        finally:
            results.close()

    def _splits(self) -> list[str]:
        if self.scan.layout == "splits":
            return split_order(self.scan)
        if self.method.startswith(("column", "folders")):   # as the table or the folders give them
            return [s for s in SPLIT_NAMES if s == "train" or any(c.split == s for c in self.ok)]
        fractions = {"val": 0.0 if self.folds else self.settings.val_fraction,
                     "test": self.settings.test_fraction}
        return [s for s in SPLIT_NAMES if s == "train" or fractions[s] > 0]

    def write_wide_enough(self) -> Store:
        """`write`, restarted with a wider store type while a file needs one (`_NeedsDtype`)."""
        while True:
            try:
                return self.write()
            except _NeedsDtype as exc:
                wider = widen(self.dtype, exc.dtype)
                if wider == self.dtype:   # a bug guard: a restart must change the store
                    raise PreprocessError(exc.message) from None
                log.info("%s; restarting with a %s store", exc.message, wider)
                self.dtype = wider

    def write(self) -> Store:
        """Pass 2: prepare every usable file in the workers and stream the rows into a new store."""
        class_index = {c: i for i, c in enumerate(self.classes)} if self.task.is_classification else {}
        splits = self._splits()
        order = {s: i for i, s in enumerate(splits)}
        todo = sorted((c for c in self.ok if c.path not in self.timed_out),
                      key=lambda c: (order[c.split], class_index.get(c.class_name, 0), c.class_rel))
        capacity = Counter(c.split for c in todo)
        spec = self.settings.spec(self.dtype, self.planes.count if self.planes else None)
        stats_split = "train" if capacity.get("train") else None  # None: every split (no train images)
        acc = Accumulator(spec.num_planes, splits, self.folds or 0, self.task)
        acc.failed += [(c, self.timed_out[c.path]) for c in self.ok if c.path in self.timed_out]
        bar = Progress(self.settings.progress, len(todo), f"decoding ({self.engine.describe()})")
        with StoreWriter(self.out, overwrite=self.settings.overwrite) as writer:
            for s in splits:
                writer.create_split(s, capacity.get(s, 0), spec.size, spec.num_planes, self.dtype,
                                    folds=bool(self.folds) and s == "train", task=self.task)
            results = self._prepared([(c.path, stats_split in (None, c.split), spec) for c in todo])
            try:
                for cand, res in zip(todo, results):
                    label = class_index[cand.class_name] if self.task.is_classification else cand.target
                    stored = self._store_one(writer, cand, res, spec, label, acc)
                    bar.update(1, 0 if stored else 1)
            finally:   # a restart (_NeedsDtype) or Ctrl-C: the engine's work on this pass stops now
                results.close()
            bar.close()
            writer.commit(*self._finish(acc, splits, stats_split))
        store = load_store(self.out)
        store.built_by = self.engine.describe()
        return store

    def _store_one(self, writer: StoreWriter, cand: Candidate, res: Prepared | Failure | NeedsDtype,
                   spec: ImageSpec, label: Any, acc: Accumulator) -> bool:
        """Append one worker result to the store (True), or record why it was skipped (False)."""
        if isinstance(res, NeedsDtype):
            raise _NeedsDtype(res)
        if isinstance(res, Failure):
            acc.failed.append((cand, res))
            return False
        want = (*spec.size, spec.num_planes)
        img = res.pixels
        if img.shape != want or img.dtype != np.dtype(self.dtype):  # checked before it can reach the store
            acc.failed.append((cand, Failure(f"{display_path(cand.path)}: prepared pixels are {img.shape} "
                                             f"{img.dtype}, expected {want} {self.dtype}", "corrupt")))
            return False
        cand.digest = res.digest
        writer.append(cand.split, img, label, display_path(cand.rel), fold=cand.fold)
        acc.add(cand, res)
        return True

    def _finish(self, acc: Accumulator, splits: list[str], stats_split: str | None) -> tuple[dict, dict]:
        """meta.json and report.json for what was stored; PreprocessError if a class got no image."""
        for cand, failure in acc.failed:
            skip(self.scan, cand.rel, failure.kind, failure.message)
        stored = Counter()
        for s in splits:
            stored.update(acc.per_class[s])
        missing = [c for c in self.classes if not stored[c]] if self.task.is_classification else []
        if missing:   # (a label without positives is reported by training, not an error here)
            examples = "; ".join(f.message for c, f in acc.failed if c.class_name in missing[:3])[:600]
            raise PreprocessError(f"no image could be decoded for class(es) {', '.join(missing)} "
                                  f"(every class needs at least one): {examples}")
        n_ch = acc.planes
        mean, std = exact_mean_std(acc.sums, acc.sumsq, acc.n_pix)
        counts = {s: {"total": acc.per_class[s]["_files"],
                      "per_class": {c: acc.per_class[s][c] for c in self.classes}} for s in splits}
        report = build_report(self.scan, self.ok, counts, self.src, acc.warnings, self.table)
        report["nodata"] = acc.nodata   # NaN, Inf and nodata samples per file (float32 stores: stored as NaN)
        if self.table and self.table.get("group_col"):   # a split or fold column may put a group on two sides
            for key, side in (("groups_in_two_splits", "split"), ("groups_in_two_folds", "fold")):
                sides: dict[str, set] = {}
                for c in self.ok:
                    if c.digest and (side == "split" or c.fold >= 0):   # stored
                        sides.setdefault(c.group, set()).add(getattr(c, side))
                report[key] = sorted(g for g, v in sides.items() if len(v) > 1)
        s = self.settings
        meta = build_meta(classes=self.classes, dtype=self.dtype, size=s.size,
                          channel_names=list(self.planes.names) if self.planes else ["R", "G", "B"] if n_ch == 3
                          else ["L"], splits=splits, counts=counts,
                          mean=mean, std=std, stats_split=stats_split or "all", layout=self.scan.layout,
                          resize=s.resize, source=display_path(self.src.absolute()), num_images=stored["_files"],
                          image_path_version=IMAGE_PATH_VERSION, **s.split_config(),
                          split=self._split_record(),
                          labels=self.table, folds=acc.fold_record(self.classes) if self.folds else None,
                          **({} if self.task.is_classification else {"task": self.task.record()}))
        return meta, report


    def _split_record(self) -> dict[str, Any]:
        """meta.json "split": the method, and the fractions and seed only where they chose splits."""
        s, chosen = self.settings, self.method not in ("column", "folders")
        return {"method": self.method, "seed": s.seed if chosen or self.folds else None,
                "val_fraction": s.val_fraction if chosen and not self.folds else None,
                "test_fraction": s.test_fraction if chosen else None, "folds": self.folds,
                "group_col": self.table.get("group_col") if self.table else None}
