"""Progress of a batch job: a tqdm bar on a terminal, a log line every 10 s elsewhere."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress", "log_lines_off_a_terminal"]

log = logging.getLogger("cnnpipe.datasets.preprocess")


class Progress:
    """A tqdm bar on an interactive terminal; otherwise a log line every 10 s and at the end."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.skipped = total, desc, 0, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="file", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int, skipped: int) -> None:
        self.done += n
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(n)
            if skipped:
                self.bar.set_postfix(skipped=self.skipped, refresh=False)
        elif self.done >= self.total or time.perf_counter() - self.last >= 10.0:
            self.last = time.perf_counter()
            rate = self.done / max(self.last - self.t0, 1e-9)
            log.info("%s: %d/%d files, %.0f files/s, %d skipped", self.desc, self.done, self.total, rate,
                     self.skipped)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StderrHandler(logging.StreamHandler):
    """Log to whatever `sys.stderr` is when a record is written (it may be replaced after setup)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def log_lines_off_a_terminal() -> None:
    """The batch jobs' log lines as plain lines on stderr: progress every 10 s off a terminal (no bar
    there), and on a terminal only warnings (a worker that died)."""
    if log.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if sys.stderr.isatty() else logging.INFO)
    log.propagate = False
