"""The data commands: `cnnpipe decode` (one file's planes) and `cnnpipe preprocess` (a folder, or a folder and a
label table, into a dataset store). Argument parsing only; each handler imports the library lazily (no jax)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_decode", "add_preprocess"]


def add_decode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="show (and optionally save) the exact channel planes of one image")
    p.add_argument("path", help="image file (PNG, TIFF, JPEG, BMP, WebP, GIF, JPEG 2000)")
    p.add_argument("--save", metavar="OUT.npy", help="write the (C, H, W) array exactly as .npy")
    p.add_argument("--channels", choices=["rgb", "native", "gray"], default="rgb",
                   help="rgb: gray expands to three equal planes (default); native: the file's own planes; gray: one luma plane")
    p.add_argument("--alpha", choices=["drop", "keep", "composite"], default="drop",
                   help="what to do with an alpha plane (default: drop)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb guard: refuse images with more pixels (default: %(default)s = library default)")
    p.add_argument("--pages", choices=["first", "planes"], default="first",
                   help="multi-page TIFF: first: page 1, noted as a warning (default); planes: every page a plane")
    p.set_defaults(func=_run_decode)


def plane_stats(plane, nodata: float | None) -> str:
    """One plane's dtype, min, max and mean over its valid values (not NaN, infinite or `nodata`), and
    the count of each kind of invalid value: what `cnnpipe decode` prints per plane."""
    import numpy as np

    x = np.asarray(plane)
    nan = np.isnan(x) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
    inf = np.isinf(x) if x.dtype.kind == "f" else nan
    nod = (x == nodata) if nodata is not None else np.zeros(x.shape, bool)
    valid = x[~(nan | inf | nod)]
    fmt = (lambda v: f"{v:>10.6g}") if x.dtype.kind == "f" else (lambda v: f"{int(v):>6}")
    if valid.size:
        mean = valid.mean(dtype=np.float64)
        head = (f"{x.dtype}  min {fmt(valid.min())}  max {fmt(valid.max())}  mean "
                + (f"{mean:10.6g}" if x.dtype.kind == "f" else f"{mean:10.3f}"))
    else:
        head = f"{x.dtype}  no valid value"
    counts = [f"{what} {int(m.sum())}" for what, m, shown in (("NaN", nan, x.dtype.kind == "f"),
                                                              ("Inf", inf, x.dtype.kind == "f"),
                                                              ("nodata", nod, nodata is not None)) if shown]
    return head + (f"  ({', '.join(counts)})" if counts else "")


def _run_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from cnnpipe.images.decode import DEFAULT_MAX_PIXELS, read_image
    from cnnpipe.images.formats import display_path

    planes = read_image(args.path, channels=args.channels, alpha=args.alpha, pages=args.pages,
                        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    if args.save:  # first, so a bad OUT fails before anything is printed
        np.save(args.save, planes.data)
    n = len(planes.channels)
    print(f"{display_path(planes.source)}: {planes.width}x{planes.height}, {n} plane{'s' if n != 1 else ''}, "
          f"{planes.bit_depth}-bit ({planes.data.dtype})"
          + (f", nodata {planes.nodata:g}" if planes.nodata is not None else ""))
    for name, plane in zip(planes.channels, planes.data):
        print(f"  {name:<2} {plane_stats(plane, planes.nodata)}")
    for note in planes.warnings:
        print(f"  warning: {note}")
    if args.save:
        print(f"saved {planes.data.shape} {planes.data.dtype} to {display_path(args.save)}")
    return 0


def add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="decode an image folder once into a dataset store",
                       description="Decode SRC/<class>/**/<image> (or SRC/<train|val|test>/<class>/**/<image>, or "
                                   "any folder of images with --labels TABLE or a Hugging Face metadata.csv|jsonl|"
                                   "parquet in SRC) into a store at OUT: per split images.npy (N, H, W, C) "
                                   "uint8/uint16 and labels.npy, meta.json and report.json (every skipped file "
                                   "and table row, duplicates).")
    p.add_argument("src", metavar="SRC", help="image folder: one sub-folder per class (or per split, then class)")
    p.add_argument("out", metavar="OUT", help="store directory to create")
    p.add_argument("--size", required=True, metavar="H[xW]", help="target size, e.g. 64 or 64x48")
    p.add_argument("--resize", choices=["crop", "pad", "stretch"], default="crop",
                   help="crop: cover and centre-crop (default); pad: fit and zero-pad; stretch: exact size")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of each class for the val split (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.0, metavar="F",
                   help="share of each class for the test split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    p.add_argument("--split", choices=["stratified", "group", "hash"], default=None,
                   help="stratified: each class's share within one image (default); group: no --group-col value "
                        "in two splits (default with --group-col); hash: a file's split never moves as files are added")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="deal the non-test files into K cross-validation folds (train with data.fold, or cnnpipe cv)")
    g = p.add_argument_group("labels from a table (CSV, TSV, JSON Lines, Parquet) instead of class folders")
    g.add_argument("--labels", metavar="TABLE", help="the table; its paths are relative to SRC (or the table's folder)")
    g.add_argument("--path-col", metavar="NAME",
                   help="file path or id column (default: the first of file_name, path, filename, image, id)")
    g.add_argument("--label-col", metavar="NAME", nargs="+",
                   help="class column (default: label); several: one 0/1 column per label (multi-label; an empty "
                        "cell or -1 is unknown)")
    g.add_argument("--label-delim", metavar="D",
                   help="the label column holds several labels joined by D ('|', ' '): multi-label")
    g.add_argument("--target-col", metavar="NAME", nargs="+", help="numeric target column(s): regression")
    g.add_argument("--task", choices=("classification", "multilabel", "regression"),
                   help="default: from the columns (several label columns, --label-delim or list-valued cells: "
                        "multilabel; --target-col: regression)")
    g.add_argument("--split-col", metavar="NAME", help="train/val/test (or fastai's is_valid true/false) column")
    g.add_argument("--group-col", metavar="NAME", help="patient/slide/scene column: no group in two splits")
    g.add_argument("--fold-col", metavar="NAME", help="cross-validation fold column (integers)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="decoding processes (default: 0 = every core)")
    p.add_argument("--channels", choices=["rgb", "gray", "native"], default="rgb",
                   help="rgb: three planes (default); gray: one luma plane; native: each file's own planes")
    p.add_argument("--pages", choices=["first", "planes"], default="first",
                   help="multi-page TIFF: first: page 1, noted in report.json (default); planes: every page a plane")
    p.add_argument("--dtype", choices=["float32"], default=None,
                   help="float32: keep every file's values as they are in a float32 store (a folder mixing integer "
                        "and float images); default: the narrowest type holding every file exactly")
    p.add_argument("--file-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a worker process spending longer on one file is stopped and replaced, the file reported "
                        "as timeout (default: %(default)s; 0: no deadline)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT once the new one is complete")
    g = p.add_argument_group("where files are prepared (the same store either way; see Preprocessing on a cluster)")
    g.add_argument("--engine", choices=["local", "dask"], default="local",
                   help="local: worker processes on this machine (default); dask: a Dask cluster (pip install "
                        "'cnnpipe[dask]'), a local one of --workers processes unless a scheduler is named")
    g.add_argument("--scheduler", metavar="ADDRESS", help="the Dask scheduler, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--scheduler-file", metavar="PATH", help="the file `dask scheduler --scheduler-file PATH` wrote")
    p.set_defaults(func=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> int:
    from cnnpipe.datasets.preprocess import PreprocessError, preprocess
    from cnnpipe.datasets.progress import log_lines_off_a_terminal
    from cnnpipe.datasets.report import failed_files, format_summary
    from cnnpipe.datasets.table_scan import LabelTable
    from cnnpipe.datasets.tables import find_metadata

    columns = {k: getattr(args, k) for k in ("path_col", "label_col", "split_col", "group_col", "fold_col",
                                             "label_delim", "target_col", "task")}
    for key in ("label_col", "target_col"):   # one name or several
        if columns[key] is not None:
            columns[key] = columns[key][0] if len(columns[key]) == 1 else tuple(columns[key])
    table = args.labels
    if table is None and any(v is not None for v in columns.values()):   # the columns of SRC's metadata.csv?
        table = find_metadata(Path(args.src)) if Path(args.src).is_dir() else None
        if table is None:
            given = next(k for k, v in columns.items() if v is not None)
            raise PreprocessError(f"--{given.replace('_', '-')}: only used with --labels TABLE (or a Hugging Face "
                                  "metadata.csv|jsonl|parquet in SRC)")
    labels = LabelTable(str(table), **columns) if table is not None else None
    log_lines_off_a_terminal()
    t0 = time.perf_counter()
    store = preprocess(args.src, args.out, size=args.size, resize=args.resize, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, seed=args.seed, workers=args.workers,
                       channels=args.channels, overwrite=args.overwrite, pages=args.pages, labels=labels,
                       split=args.split, folds=args.folds, dtype=args.dtype, file_timeout=args.file_timeout,
                       engine=args.engine, scheduler=args.scheduler, scheduler_file=args.scheduler_file)
    print(format_summary(store, elapsed_s=time.perf_counter() - t0, engine=store.built_by))
    return 1 if failed_files(store.report) else 0  # the store is complete; 1 says some files are not in it
