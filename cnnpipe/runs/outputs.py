"""Where predictions go: CSV or JSON Lines rows streamed to a file that appears only when complete, or stdout.

CSV: ``path,rank,class,probability,error`` (top-k rows per file, or one row with its
error). JSON Lines (a name ending in ``.jsonl``): one object per file,
``{"path", "predictions": [{"class", "probability"}], "error"}``. A multi-label run:
``path,labels,<label 1>,...,error`` (the chosen labels joined by "|", then every label's
probability), ``{"path", "labels": [...], "probabilities": {label: p}, "error"}``; a
regression run: ``path,<target 1>,...,error`` and ``{"path", "values": {target: v}, "error"}``. Paths are in
`display_path` form (names that are not UTF-8 escaped reversibly). Rows are written as
they come to a temporary sibling renamed onto the output at the end, so readers never
see half a file and memory does not grow with the file count; a device or a named pipe
(`/dev/stdout`, a FIFO) is written to directly, and a symbolic link's target is written.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from cnnpipe.images.formats import display_path

__all__ = ["PredictionWriter"]


class PredictionWriter:
    """Write `Prediction`s to `out` (CSV or .jsonl), or print them to stdout when `out` is None.

    Raises:
      OSError: the output cannot be created (naming it), before any prediction is made.
    """

    def __init__(self, out: str | os.PathLike | None, task: Any = None) -> None:
        self.out = Path(out) if out else None
        self.task = None if task is None or task.is_classification else task   # multilabel / regression columns
        self.jsonl = bool(self.out) and self.out.suffix.lower() == ".jsonl"
        self.rows = 0
        self._tmp: Path | None = None
        self._file: TextIO | None = None
        if self.out is None:
            return
        target = self.out.resolve() if self.out.is_symlink() else self.out  # write where a link points
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name for the rows", str(self.out))
        streaming = target.exists() and not target.is_file()  # a device or a pipe: written to, never replaced
        self._dest = target
        self._tmp = None if streaming else target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            self._file = open(target if streaming else self._tmp, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or "cannot write", str(self.out)) from None
        self._csv = csv.writer(self._file)
        if not self.jsonl:
            self._csv.writerow(self._header())

    def _header(self) -> list[str]:
        if self.task is None:
            return ["path", "rank", "class", "probability", "error"]
        names = list(self.task.names)
        return ["path", "labels", *names, "error"] if self.task.kind == "multilabel" else ["path", *names, "error"]

    def _task_record(self, path: str, pred: Any) -> tuple[dict[str, Any], list[Any]]:
        """(JSON Lines object, CSV row) of a multi-label or regression file."""
        names = self.task.names
        values = dict(zip(names, pred.outputs))
        cells = [f"{v:.6g}" if self.task.kind == "regression" else f"{v:.6f}" for v in pred.outputs] \
            if not pred.error else [""] * len(names)
        if self.task.kind == "multilabel":
            obj = {"path": path, "labels": list(pred.chosen), "probabilities": values, "error": pred.error}
            return obj, [path, "|".join(pred.chosen), *cells, pred.error or ""]
        return {"path": path, "values": values, "error": pred.error}, [path, *cells, pred.error or ""]

    def write(self, pred: Any) -> None:
        """One file's rows."""
        path = display_path(pred.path)
        if self.task is not None:
            return self._write_task(path, pred)
        if self._file is None:
            text = pred.error if pred.error else ", ".join(f"{c} {p:.4f}" for c, p in pred.top)
            print(f"{path}: {text}" if not pred.error else f"{path}: error: {text}")
            return
        try:
            if self.jsonl:
                obj = {"path": path, "predictions": [{"class": c, "probability": p} for c, p in pred.top],
                       "error": pred.error}
                self._file.write(json.dumps(obj, ensure_ascii=False) + "\n")
            elif pred.error:
                self._csv.writerow([path, "", "", "", pred.error])
            else:
                self._csv.writerows([path, rank, c, f"{p:.6f}", ""] for rank, (c, p) in enumerate(pred.top, 1))
        except OSError as exc:  # disk full: the output is the one thing that stops the run
            raise OSError(exc.errno, exc.strerror or "cannot write", str(self.out)) from None
        self.rows += 1

    def _write_task(self, path: str, pred: Any) -> None:
        obj, row = self._task_record(path, pred)
        if self._file is None:
            if pred.error:
                print(f"{path}: error: {pred.error}")
            elif self.task.kind == "multilabel":
                print(f"{path}: {', '.join(pred.chosen) or '(no label)'} ["
                      + ", ".join(f"{n} {p:.4f}" for n, p in zip(self.task.names, pred.outputs)) + "]")
            else:
                print(f"{path}: " + ", ".join(f"{n} {v:.6g}" for n, v in zip(self.task.names, pred.outputs)))
            return
        try:
            self._file.write(json.dumps(obj, ensure_ascii=False) + "\n") if self.jsonl else self._csv.writerow(row)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or "cannot write", str(self.out)) from None
        self.rows += 1

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
            if exc_type is None and self._tmp is not None:
                os.replace(self._tmp, self._dest)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or "cannot write", str(self.out)) from None
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
        if exc_type is None:
            print(f"wrote {self.rows} files' rows to {display_path(self.out)}", file=sys.stderr)
