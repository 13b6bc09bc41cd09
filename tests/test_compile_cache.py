"""JAX's persistent compilation cache: where it lives, that it is used, that a bad entry only costs a compile."""

import jax
import jax.monitoring
import numpy as np
import pytest

from cnnpipe.config import load_config
from cnnpipe.runs.load import load_run
from cnnpipe.training.compile_cache import ENV_VAR, _pass_on, compile_cache_dir, enable_compile_cache
from cnnpipe.training.train import train_and_evaluate

TINY = ["data.size=[16,16]", "data.num_train=64", "data.num_val=16", "train.batch_size=16",
        "train.eval_batch_size=16", "train.epochs=1", "model=[{type: conv, filters: 4}, {type: relu}, {type: flatten}]"]


def test_the_directory_follows_the_setting_the_variable_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "cnnpipe" / "jax"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
    assert compile_cache_dir(tmp_path / "flag") == tmp_path / "flag"      # the --compile-cache flag wins
    for off in ("off", "OFF", "0", "none"):
        assert compile_cache_dir(off) is None
    monkeypatch.setenv(ENV_VAR, "off")
    assert compile_cache_dir() is None


def test_on_cpu_each_cpu_model_gets_its_own_directory(tmp_path):
    try:
        path = enable_compile_cache(tmp_path)
        assert path.parent == tmp_path and path.name.startswith("cpu-")
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert enable_compile_cache("off") is None and jax.config.jax_compilation_cache_dir is None
    finally:
        enable_compile_cache()   # back to this session's cache


def test_only_xla_false_alarm_about_tuning_hints_is_dropped(capsys):
    _pass_on(["E1125 cpu_aot_loader.cc:195] Loading XLA:CPU AOT result. Target machine feature "
              "+prefer-no-gather is not  supported on the host machine.",
              "E1125 cpu_aot_loader.cc:195] Loading XLA:CPU AOT result. Target machine feature "
              "+avx512f is not  supported on the host machine.",
              "some other message"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "+avx512f" in err[0] and err[1] == "some other message"


def params_of(run_dir):
    return [np.asarray(x) for x in jax.tree.leaves(load_run(run_dir, "latest").state)]


def test_a_second_run_loads_its_steps_from_the_cache_and_a_broken_entry_is_recompiled(tmp_path):
    hits = []

    def listen(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        cache = tmp_path / "cache"
        cfg = load_config(None, TINY)
        first = train_and_evaluate(cfg, tmp_path / "a", log=lambda _: None, compile_cache=cache)
        cold_hits = len(hits)
        second = train_and_evaluate(cfg, tmp_path / "b", log=lambda _: None, compile_cache=cache)
        warm_hits = len(hits) - cold_hits
        entries = [p for p in cache.rglob("*") if p.is_file() and "step" in p.name]
        assert entries, "the train and eval steps were not cached"
        for p in entries:   # every cached step truncated or overwritten: unreadable, never run
            p.write_bytes(p.read_bytes()[:100])
        with pytest.warns(UserWarning, match="persistent compilation cache"):
            third = train_and_evaluate(cfg, tmp_path / "c", log=lambda _: None, compile_cache=cache)
    finally:
        jax.monitoring.unregister_event_listener(listen)
        enable_compile_cache()
    assert warm_hits >= 2   # at least the train and eval steps
    assert first["final_val_accuracy"] == second["final_val_accuracy"] == third["final_val_accuracy"]
    a, b, c = params_of(tmp_path / "a"), params_of(tmp_path / "b"), params_of(tmp_path / "c")
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))
