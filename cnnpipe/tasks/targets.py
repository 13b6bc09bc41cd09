"""Table cells -> targets: multi-label sets, 0/1 label columns with unknowns, numeric targets.

Multi-label targets come in the three forms public datasets use:

- one column of labels joined by a delimiter (ChestX-ray14's ``Atelectasis|Effusion``,
  Planet's and the Human Protein Atlas's space-separated tags): `split_labels`;
  an empty cell is an image with no label (a row of negatives);
- one list-valued cell (a Parquet ``list<string>`` column, a JSON Lines array:
  BigEarthNet): `list_labels`; an empty list likewise;
- one 0/1 column per label (CheXpert): `flag_value`, where an empty cell and the values
  in `UNKNOWN_VALUES` (CheXpert's -1, "uncertain") mean unknown: NaN in the store, masked
  out of the loss and the metrics for that label (CheXpert's "U-Ignore" policy).

Regression targets are numbers (`number_value`); an empty cell is a missing value (NaN,
masked), a row whose every target is missing is not used.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence

__all__ = ["TargetError", "UNKNOWN_VALUES", "split_labels", "list_labels", "is_list_cell", "flag_value",
           "number_value", "multi_hot", "target_text"]

# what a 0/1 label column may hold besides 0 and 1, meaning "unknown" (case-insensitive)
UNKNOWN_VALUES = frozenset({"-1", "-1.0", "nan", "na", "n/a", "?", "uncertain", "unknown"})
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ONE = frozenset({"1", "1.0", "true", "yes", "y", "t", "positive", "pos"})
_ZERO = frozenset({"0", "0.0", "false", "no", "n", "f", "negative", "neg"})


class TargetError(ValueError):
    """A cell that is not a target of the task (the message says why; the caller names the row)."""


def split_labels(cell: str | None, delimiter: str) -> frozenset[str]:
    """The labels of a delimited cell ("a|b", "a b"): stripped, empty parts dropped; an empty cell: none."""
    if cell is None:
        return frozenset()
    parts = cell.split() if delimiter.isspace() else cell.split(delimiter)
    return frozenset(p.strip() for p in parts if p.strip())


def is_list_cell(cell: str | None) -> bool:
    """Whether `cell` holds a JSON array (how `cnnpipe.datasets.tables` writes a list-valued cell)."""
    return cell is not None and cell.startswith("[") and cell.endswith("]")


def list_labels(cell: str | None) -> frozenset[str]:
    """The labels of a list-valued cell (a JSON array of strings or numbers); None or [] : none.
    Raises TargetError for anything else."""
    if cell is None:
        return frozenset()
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        raise TargetError(f"{cell[:40]!r} is not a list of labels") from None
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise TargetError(f"{cell[:40]!r} is not a list of labels (strings or integers)")
    return frozenset(str(v).strip() for v in value if str(v).strip())


def flag_value(cell: str | None) -> float:
    """A 0/1 label cell: 1.0, 0.0, or NaN (unknown: empty, or one of `UNKNOWN_VALUES`).
    Raises TargetError naming the value otherwise."""
    if cell is None:
        return math.nan
    v = cell.strip().lower()
    if v in _ONE:
        return 1.0
    if v in _ZERO:
        return 0.0
    if v in UNKNOWN_VALUES or not v:
        return math.nan
    raise TargetError(f"{cell[:40]!r} is not 0, 1 or unknown (empty, -1)")


def number_value(cell: str | None) -> float:
    """A numeric target cell as float (NaN when empty): ASCII digits, an optional sign, point and exponent.
    Raises TargetError for anything else (text, "1,5", "1_000", NaN, infinity)."""
    if cell is None or not cell.strip():
        return math.nan
    text = cell.strip()
    # a plain decimal number as a spreadsheet writes it: float() would also take "1_000" and other scripts' digits
    if not _NUMBER.fullmatch(text):
        raise TargetError(f"{cell[:40]!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise TargetError(f"{cell[:40]!r} is not a finite number")
    return value


def multi_hot(labels: Iterable[str], names: Sequence[str]) -> tuple[float, ...]:
    """1.0 for each of `names` in `labels`, else 0.0."""
    present = set(labels)
    return tuple(1.0 if n in present else 0.0 for n in names)


def target_text(target: Sequence[float] | frozenset[str]) -> str:
    """A target as text, for messages and the comparison of a file's rows: "a|b", "1,0,?", "3.5"."""
    if isinstance(target, frozenset):
        return "|".join(sorted(target))
    return ",".join("?" if math.isnan(v) else f"{v:g}" for v in target)
