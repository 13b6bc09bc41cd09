"""What goes wrong reading a checkpoint, said in one line: the error, its reason, and Orbax's noise kept quiet.

`cnnpipe.training.checkpoint` raises `CorruptCheckpointError` for a step whose files
cannot be read; `_reason` turns whatever Orbax/tensorstore raised into one short,
deterministic line (paths relative to the step folder, no object addresses), and
`_quiet_failed_reads` keeps the tracebacks of reads Orbax abandons after a failure off
the terminal.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["CorruptCheckpointError"]


class _QuietExpected(logging.Filter):
    # expected by design: mid-epoch checkpoints have no validation accuracy, and
    # evaluate/predict open the checkpoints read-only
    _EXPECTED = ("did not provide metrics", "read_only=True", "directory is read only",
                 "Metadata file does not exist",  # the earlier format's items have none
                 # a damaged _CHECKPOINT_METADATA: the step that is restored is checked and
                 # reported as one error line (`Checkpoints._check_step_metadata`)
                 "Failed to read Metadata file", "Failed to json parse Metadata file")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self._EXPECTED)


logging.getLogger("absl").addFilter(_QuietExpected())


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files cannot be read: names its step folder, what is wrong and the other saved steps."""


def _reason(exc: BaseException, where: Path) -> str:
    """What is wrong, in one short line, with paths relative to the step folder `where`.

    The innermost cause is the informative one: Orbax wraps tensorstore's error in a bare
    Exception whose text is a page of TensorStore spec.
    """
    while (inner := exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)) is not None:
        exc = inner
    if isinstance(exc, UnicodeDecodeError):
        text = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    elif isinstance(exc, json.JSONDecodeError):
        text = f"not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    elif isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc).split("See full TensorStore details")[0] or type(exc).__name__
    text = " ".join(text.split()).replace(f"{where}{os.sep}", "").replace(str(where), ".")
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text).rstrip(" .:")
    return text if len(text) <= 200 else text[:200] + "..."


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[Callable[[], None]]:
    """Drop the tracebacks of the reads Orbax abandons when one read of a restore fails.

    Orbax gathers every array read in a private event loop and closes it at the first
    failure; the other reads then finish into the closed loop (on tensorstore's threads),
    or are finalised unfinished, and Python prints each as "Exception ignored in ...": a
    page of noise around the one error line. Anything else still reaches the previous
    hook. After a failure, call the yielded `settle` to wait for the stragglers.
    """
    previous, heard = sys.unraisablehook, [time.monotonic()]

    def hook(args: Any) -> None:  # noise: a read finalised unfinished, or finishing into the closed loop
        if isinstance(args.object, types.CoroutineType) or "Event loop is closed" in str(args.exc_value):
            heard[0] = time.monotonic()
        else:
            previous(args)

    def settle() -> None:  # until no read has ended for 0.25 s (at most 2 s): local reads take milliseconds
        gc.collect()
        heard[0], give_up = time.monotonic(), time.monotonic() + 2
        while time.monotonic() < min(give_up, heard[0] + 0.25):
            time.sleep(0.05)

    class _AbandonedReads(logging.Filter):  # the same noise through asyncio's logger
        def filter(self, record: logging.LogRecord) -> bool:
            if "exception was never retrieved" in record.getMessage():
                heard[0] = time.monotonic()
                return False
            return True

    asyncio_log, quiet = logging.getLogger("asyncio"), _AbandonedReads()
    sys.unraisablehook = hook
    asyncio_log.addFilter(quiet)
    try:
        yield settle
    finally:
        sys.unraisablehook = previous
        asyncio_log.removeFilter(quiet)
