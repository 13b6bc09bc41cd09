"""JAX's persistent compilation cache, kept in the user's cache directory.

A run's train and eval steps compile to the same programs every time the model,
data shape, device count and software stay the same; with the cache the second run
loads them from disk instead of compiling (seconds per run on a CPU). Where it lives:

- default: ``$XDG_CACHE_HOME/cnnpipe/jax`` (``~/.cache/cnnpipe/jax``);
- ``CNNPIPE_COMPILE_CACHE=DIR`` (or ``cnnpipe train --compile-cache DIR``) moves it;
- ``CNNPIPE_COMPILE_CACHE=off`` disables it.

A stale entry cannot give a wrong program: JAX keys each entry by the compiled
program's text, the jaxlib and backend versions, the XLA flags, the compile options
and the device topology, and recompiles on a miss or an unreadable entry. A CPU
executable is machine code for the host's instruction set, which that key does not
name, so on CPU the directory is split by a fingerprint of the CPU model and its
feature flags: a home directory shared by different machines never hands one's code
to another.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cnnpipe.fdcapture import stderr_lines
from cnnpipe.files import default_cache_dir

__all__ = ["compile_cache_dir", "enable_compile_cache", "quiet_cache_loads", "run_once", "ENV_VAR"]

ENV_VAR = "CNNPIPE_COMPILE_CACHE"
_OFF = ("off", "none", "0", "false", "no")


def _cpu_fingerprint() -> str:
    """A short hash of this machine's CPU model and feature flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            keep = [line for line in f if line.split(":")[0].strip() in ("model name", "flags", "Features")]
        text += "".join(sorted(set(keep)))
    except OSError:  # not Linux: the processor string is what the OS tells
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def compile_cache_dir(setting: str | os.PathLike | None = None) -> Path | None:
    """The cache directory for `setting` (a path, "off", or None for $CNNPIPE_COMPILE_CACHE / the default)."""
    value = os.fspath(setting) if setting is not None else os.environ.get(ENV_VAR)
    if value is not None and value.strip().lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    return default_cache_dir() / "jax"   # beside the folder cache


def enable_compile_cache(setting: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `compile_cache_dir(setting)`; return the directory used.

    Every program is cached, however quick its compile (the steps of small models
    compile in well under JAX's default 1 s threshold). On a CPU backend a
    sub-directory per CPU fingerprint is used. Returns None when disabled.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = compile_cache_dir(setting)
    compilation_cache.reset_cache()  # JAX decides once whether a cache is used; decide again
    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    if jax.default_backend() == "cpu":
        path = path / f"cpu-{_cpu_fingerprint()}"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# XLA:CPU (jaxlib 0.10.1) logs two error lines for every executable it loads from the
# cache, because the compile-time feature list holds the tuning hints +prefer-no-gather
# and +prefer-no-scatter, which are not CPU features and so never appear in the host's
# list: "... could lead to execution errors such as SIGILL". Only those two lines are
# dropped; any other message, a real instruction-set mismatch included, is kept.
_FALSE_ALARM = re.compile(r"Target machine feature \+prefer-no-(gather|scatter) is not\s+supported")


@contextlib.contextmanager
def quiet_cache_loads() -> Iterator[None]:
    """Run a block that compiles (or loads from the cache), passing on all it prints to stderr but
    XLA's false alarm about the tuning hints of cached CPU executables."""
    with contextlib.ExitStack() as stack:
        lines = stack.enter_context(stderr_lines())
        stack.callback(lambda: _pass_on(lines))
        yield


def _pass_on(lines: list[str]) -> None:
    for line in lines:
        if not _FALSE_ALARM.search(line):
            print(line, file=sys.stderr)


def run_once(fn: Callable[[], Any]) -> Any:
    """``fn()`` (no arguments, returning arrays) as one jitted program compiled with XLA's backend
    optimisations off.

    For programs a run calls once, such as the model's initialiser: their compile time is
    all that matters. The default CNN's initialiser and optimizer state took 1.9 s to
    compile on a 2-core CPU, 0.5 s at optimisation level 0, and ran in 3 and 10 ms.
    Integer work (threefry random bits) is exact either way; float rounding may differ.
    """
    import jax

    return jax.jit(fn).lower().compile(compiler_options={"xla_backend_optimization_level": 0})()
