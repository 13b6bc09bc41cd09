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


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_decode,
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
