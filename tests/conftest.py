"""Test-session setup: JAX's persistent compilation cache lives in this session's temp dir.

`cnnpipe train` caches compiled steps, and folder and tfds sources their stores, under
the user's cache directory; tests must neither read a cache left by earlier runs nor
fill the user's, so the session gets its own (subprocesses inherit the environment
variables). Under pytest-xdist the
workers of one session share it: a program one worker compiled (the tiny runs' train
steps, say) is loaded by the others instead of compiled again. JAX keys each entry by
the program and the compile settings, and recompiles an entry it cannot read.
"""

import os

import pytest
from hypothesis import settings as hypothesis_settings

# Deterministic property tests: the same examples on every run and machine (CI included);
# a new failure found by exploring locally is kept as an @example.
hypothesis_settings.register_profile("cnnpipe", derandomize=True, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cnnpipe"))


@pytest.fixture(scope="session", autouse=True)
def _caches_per_session(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # an xdist worker's base temp is <session>/popen-gwN: the session's folder is shared by its workers
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    paths = {"CNNPIPE_COMPILE_CACHE": shared / "jax-compile-cache", "XDG_CACHE_HOME": base / "xdg-cache"}
    old = {name: os.environ.get(name) for name in paths}
    for name, path in paths.items():
        path.mkdir(exist_ok=True)
        os.environ[name] = str(path)
    yield paths
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _xla_flags_stay_the_sessions():
    """A test that runs `cnnpipe train` in this process sets XLA_FLAGS (the CLI's CPU device
    count) before jax starts; the flags stay read by this process's backend, but must not leak
    into the subprocesses of later tests (a 2-device run would find 1 device)."""
    old = os.environ.get("XLA_FLAGS")
    yield
    if old is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = old


# The slowest test files (compiles, training runs, subprocesses), longest first. pytest-xdist's
# `--dist loadfile` hands out files in collection order, so starting these first leaves short files
# for the end instead of one worker finishing a long file alone.
_SLOW_FIRST = ("test_finetune", "test_train", "test_steps", "test_dispatch", "test_distributed", "test_notebooks",
               "test_cli_train", "test_predict", "test_native_planes", "test_scientific_store", "test_imbalance",
               "test_backbones", "test_layers", "test_dask_engine", "test_checkpoint", "test_normalize")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))   # stable: a file's order is kept
