"""The `data.normalize` part of the config schema, and its one-line checks.

A setting is ``zscore``, ``{window: [low, high]}`` (or one ``[low, high]`` per plane) or
``{percentile: [low, high]}``. `check_normalize` runs before pydantic sees the value, so
every mistake is one `ConfigError` naming the key and the value, not a union's list of
attempts: numbers only (not strings, booleans, NaN or infinity), a window inside float32's
range (what the model computes in), low below high, percentiles within 0..100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cnnpipe.config_errors import ConfigError, short

__all__ = ["check_normalize", "FLOAT32_MAX"]

FLOAT32_MAX = 3.4028234663852886e38


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= FLOAT32_MAX


def _pair(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_number, v)) and v[0] < v[1]


def check_normalize(value: Any) -> Any:
    """`value` unchanged when it is a valid `data.normalize`; ConfigError (one line) otherwise."""
    if value == "zscore":
        return value
    if not (isinstance(value, Mapping) and list(value) in (["window"], ["percentile"])):
        raise ConfigError(f"data.normalize: got {short(value)}; expected zscore, {{window: [low, high]}} (or one "
                          "[low, high] per plane) or {percentile: [low, high]}")
    key, spec = next(iter(value.items()))
    if key == "window" and not (_pair(spec) or (isinstance(spec, (list, tuple)) and spec and all(map(_pair, spec)))):
        raise ConfigError(f"data.normalize.window: got {short(spec)}; expected [low, high], or one [low, high] per "
                          "plane, of finite numbers with low < high (raw pixel units, within float32's range)")
    if key == "percentile" and not (_pair(spec) and 0 <= spec[0] and spec[1] <= 100):
        raise ConfigError(f"data.normalize.percentile: got {short(spec)}; expected [low, high] with "
                          "0 <= low < high <= 100, e.g. [2, 98]")
    return value
