"""Command-line entry point: argument parsing only; every command calls the library.

Each sub-command registers itself through one `_add_<name>` function listed in
`_COMMANDS`; its handler imports the library lazily so `cnnpipe --help` and
`cnnpipe decode` never pay for importing jax.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2  # bad input (a file, key or value): one line on stderr, no traceback


class CLIError(Exception):
    """An error to report as one line on stderr with exit status 2."""


def _add_decode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="show (and optionally save) the exact channel planes of one image")
    p.add_argument("path", help="image file (PNG, TIFF, JPEG, BMP, WebP, GIF)")
    p.add_argument("--save", metavar="OUT.npy", help="write the (C, H, W) array exactly as .npy")
    p.add_argument("--channels", choices=["rgb", "native", "gray"], default="rgb",
                   help="rgb: gray expands to three equal planes (default); native: the file's own planes; gray: one luma plane")
    p.add_argument("--alpha", choices=["drop", "keep", "composite"], default="drop",
                   help="what to do with an alpha plane (default: drop)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb guard: refuse images with more pixels (default: %(default)s = library default)")
    p.set_defaults(func=_run_decode)


def _run_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from cnnpipe.decode import DEFAULT_MAX_PIXELS, read_image

    planes = read_image(args.path, channels=args.channels, alpha=args.alpha,
                        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    print(f"{planes.source}: {planes.width}x{planes.height}, {len(planes.channels)} planes, "
          f"{planes.bit_depth}-bit ({planes.data.dtype})")
    for name, plane in zip(planes.channels, planes.data):
        print(f"  {name:<2} {plane.dtype}  min {int(plane.min()):>6}  max {int(plane.max()):>6}  "
              f"mean {float(plane.mean(dtype=np.float64)):10.3f}")
    if args.save:
        np.save(args.save, planes.data)
        print(f"saved {planes.data.shape} {planes.data.dtype} to {args.save}")
    return 0


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="decode an image folder once into a dataset store",
                       description="Decode SRC/<class>/**/<image> (or SRC/<train|val|test>/<class>/**/<image>) "
                                   "into a store at OUT: per split images.npy (N, H, W, C) uint8/uint16 and "
                                   "labels.npy, meta.json and report.json (every skipped file, duplicates).")
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
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="decoding processes (default: 0 = every core)")
    p.add_argument("--channels", choices=["rgb", "gray"], default="rgb",
                   help="rgb: three planes (default); gray: one luma plane")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT once the new one is complete")
    p.set_defaults(func=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> int:
    import logging

    from cnnpipe.preprocess import format_summary, preprocess

    logger = logging.getLogger("cnnpipe.preprocess")
    if not sys.stderr.isatty() and not logger.handlers:
        # no progress bar off a terminal: a log line every 10 s instead
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    store = preprocess(args.src, args.out, size=args.size, resize=args.resize, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, seed=args.seed, workers=args.workers,
                       channels=args.channels, overwrite=args.overwrite)
    print(format_summary(store))
    return 0


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_decode,
    _add_preprocess,
]


def build_parser() -> argparse.ArgumentParser:
    """The `cnnpipe` argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    from cnnpipe.decode import DecodeError

    try:
        return int(args.func(args) or 0)
    except (CLIError, DecodeError, FileNotFoundError, ValueError) as exc:
        # ValueError covers the library's own input errors (config keys, store
        # contents); each message already names the file, key or value.
        print(f"cnnpipe {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"cnnpipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
