"""The training loop's small parts: metrics sink, stopwatch, position, epoch loop, bar-safe lines."""

import io
import math
import sys

import numpy as np
import pytest

from cnnpipe.training.dispatch import Chunks
from cnnpipe.training.loop import EpochLoop, Monitor, Position
from cnnpipe.training.runlog import MetricsSink, NonFiniteLossError, Stopwatch
from cnnpipe.training.train import _bar_safe


def metrics(loss, acc=0.5, lr=1e-3):
    return {"loss": np.float32(loss), "accuracy": np.float32(acc), "learning_rate": np.float32(lr),
            "nonfinite": np.bool_(not math.isfinite(loss))}


class Tracked(dict):
    """Metrics that record the first time the host reads a value from them."""

    def __init__(self, reads, step, **kw):
        super().__init__(metrics(**kw))
        self.reads, self.step = reads, step

    def __getitem__(self, key):
        if self.step not in self.reads:
            self.reads.append(self.step)
        return super().__getitem__(key)


def sink(max_nonfinite=3):
    out = []
    return MetricsSink(out.append, max_nonfinite, lambda: "ckpt/4"), out


def test_sink_reads_each_step_one_step_late_and_averages_the_window():
    s, out = sink()
    reads = []
    s.push(1, 0, Tracked(reads, 1, loss=1.0, acc=0.0))
    assert reads == []                       # step 1 stays in flight
    s.push(2, 0, Tracked(reads, 2, loss=3.0, acc=1.0))
    assert reads == [1]                      # pushing step 2 reads step 1, not step 2
    record = s.flush(2, 0, images_per_sec=10.0)
    assert reads == [1, 2]
    assert record == out[0] == {"step": 2, "epoch": 1, "loss": 2.0, "accuracy": 0.5,
                                "learning_rate": pytest.approx(1e-3), "images_per_sec": 10.0}
    assert s.flush(3, 0, None) is None and len(out) == 1   # an empty window writes nothing


def test_nonfinite_steps_are_logged_alone_and_stop_the_run_when_consecutive():
    s, out = sink(max_nonfinite=2)
    s.push(1, 0, metrics(float("nan")))
    s.push(2, 0, metrics(1.0))               # a finite step resets the count
    s.push(3, 0, metrics(float("inf")))
    s.flush(3, 0, None)
    assert [r.get("nonfinite") for r in out] == [True, True, None]   # at once; the average at flush
    assert out[2]["loss"] == 1.0             # the average leaves non-finite steps out
    s.push(4, 0, metrics(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row \(steps 3-4\).*Last good checkpoint: ckpt/4"):
        s.settle()
    assert s.nonfinite_total == 3


def test_stopwatch_adds_phases_and_reports_the_rest_as_other():
    w = Stopwatch()
    with w.phase("eval"):
        pass
    w.add("eval", 1.0)
    w.add("steps", 2.0)
    w.start -= 5.0                           # as if 5 s had passed
    report = w.report()
    assert report["eval"] == pytest.approx(1.0, abs=0.01) and report["steps"] == 2.0
    assert report["total"] == pytest.approx(5.0, abs=0.05)
    assert report["other"] == pytest.approx(2.0, abs=0.05)


def test_compile_seconds_count_overlapping_events_once():
    w = Stopwatch()
    event = Stopwatch._EVENTS[-1]
    w._listen(event, 1.0)                    # two compiles that ran at the same time, in threads
    w._listen(event, 1.0)
    w._listen("/jax/some/other/event", 5.0)  # not a compile event
    assert w.compile_seconds == pytest.approx(1.0, abs=0.01)


def ev(accuracy=0.5, loss=1.0, balanced=0.5):
    return {"accuracy": accuracy, "loss": loss, "balanced_accuracy": balanced}


def test_position_round_trips_and_keeps_the_best_epoch():
    p = Position(step=10)
    assert p.end_epoch(ev(0.5)) and (p.epoch, p.step_in_epoch, p.best_step) == (1, 0, 10)
    p.step = 20
    assert not p.end_epoch(ev(0.4)) and p.best_val_accuracy == 0.5 and p.best_step == 10
    assert not p.stopped   # no early stopping by default, however long
    assert Position.from_dict({**p.as_dict(), "rng": [0, 1]}) == p
    # a position saved before early stopping existed: its best was by val accuracy
    old = Position.from_dict({"epoch": 2, "step_in_epoch": 0, "step": 20, "best_val_accuracy": 0.5, "best_step": 10})
    assert not old.end_epoch(ev(0.45)) and old.best_step == 10


def run_epochs(monitor, results):
    p, epochs = Position(), 0
    for i, r in enumerate(results):
        p.step = 10 * (i + 1)
        p.end_epoch(r, monitor)
        epochs += 1
        if p.stopped:
            break
    return p, epochs


def test_early_stopping_counts_epochs_without_improvement_as_keras_does():
    losses = [1.0, 0.9, 0.95, 0.91, 0.5]
    p, epochs = run_epochs(Monitor("val_loss", 0.0, 2), [ev(loss=v) for v in losses])
    assert epochs == 4 and p.stopped and p.best_step == 20 and p.best_value == 0.9 and p.wait == 2
    # min_delta: +0.005 is no improvement for patience, yet the better checkpoint is still the best one
    accs = [0.5, 0.505, 0.51, 0.9]
    p, epochs = run_epochs(Monitor("val_accuracy", 0.01, 2), [ev(accuracy=v) for v in accs])
    assert epochs == 3 and p.stopped and p.best_step == 30 and p.best_val_accuracy == 0.51
    p, epochs = run_epochs(Monitor("balanced_accuracy", 0.0, 1), [ev(balanced=v) for v in (0.2, 0.3, 0.3)])
    assert epochs == 3 and p.best_step == 20
    p, epochs = run_epochs(Monitor("val_loss", 0.0, 3), [ev(loss=v) for v in (3, 2, 1, 0.5)])
    assert epochs == 4 and not p.stopped and p.best_step == 40


def fake_step(state, i, n):
    return state + 1, metrics(float(state))


def fake_steps(state, i, n, k=4):
    """`n` steps in one call, metrics as (k,) arrays (dispatch.repeating's form)."""
    losses = np.zeros(k, np.float32)
    losses[:n] = np.arange(state, state + n)
    return state + n, {"loss": losses, "accuracy": np.full(k, 0.5, np.float32),
                       "learning_rate": np.full(k, 1e-3, np.float32), "nonfinite": np.zeros(k, bool)}


def one_call(i, n):
    return (i, n)


@pytest.mark.parametrize("step, chunks", [(fake_step, Chunks(1, auto=False)), (fake_steps, Chunks(4, auto=False)),
                                          (fake_steps, Chunks(4, auto=True))])
def test_epoch_loop_logs_every_k_steps_checkpoints_mid_epoch_and_resumes_mid_epoch(step, chunks):
    s, out = sink()
    saves, calls = [], []
    loop = EpochLoop(lambda st, i, n: (calls.append((i, n)), step(st, i, n))[1], s, Stopwatch(), batch_size=8,
                     steps_per_epoch=10, log_every=4, checkpoint_every=3,
                     save=lambda st, pos: saves.append((pos.step, pos.step_in_epoch, st)), chunks=chunks)
    pos = Position()
    state = loop.run(0, one_call, pos)
    assert state == 10 and (pos.step, pos.step_in_epoch) == (10, 10)
    assert [r["step"] for r in out] == [4, 8, 10]                 # every 4 steps and the epoch's last
    assert [r["loss"] for r in out] == [1.5, 5.5, 8.5]            # window averages of losses 0..9
    assert saves == [(3, 3, 3), (6, 6, 6), (9, 9, 9)]             # the epoch's end is the caller's
    assert loop.images_trained == 80
    # no call runs past a log line (4, 8), a checkpoint (3, 6, 9) or the epoch's end
    bounds = [(i, i + n) for i, n in calls]
    assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and bounds[-1][1] == 10
    assert not any(i < e < j for i, j in bounds for e in (3, 4, 6, 8, 9))
    if chunks.k == 4 and not chunks.auto:
        assert calls == [(0, 3), (3, 1), (4, 2), (6, 2), (8, 1), (9, 1)]
    resumed = Position(epoch=1, step_in_epoch=6, step=16)
    loop.run(16, one_call, resumed)
    assert (resumed.step, resumed.step_in_epoch) == (20, 10) and loop.images_trained == 80 + 32


def test_epoch_lines_clear_the_progress_bar_instead_of_splitting_it(monkeypatch):
    from tqdm import tqdm

    term = io.StringIO()                     # a terminal: stdout and stderr on one screen
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    bar = tqdm(total=10, file=sys.stderr, disable=False, mininterval=0, leave=False)
    bar.update(3)
    bar.set_postfix(acc="0.981")
    _bar_safe(print, bar)("epoch 3/10: val loss 0.1")
    bar.close()
    pieces = [p.strip() for p in term.getvalue().replace("\r", "\n").split("\n")]
    assert "epoch 3/10: val loss 0.1" in pieces
    assert "]epoch" not in term.getvalue()


def test_a_resumed_sink_logs_and_stops_as_an_uninterrupted_one():
    losses = [1.0, 2.0, math.nan, 4.0, math.nan, math.nan]

    def feed(s, items):
        for step, loss in items:
            s.push(step, 0, metrics(loss))

    whole, out = sink(max_nonfinite=3)
    feed(whole, enumerate(losses[:4], 1))
    whole.flush(4, 0, None)
    first, _ = sink(max_nonfinite=3)
    feed(first, enumerate(losses[:3], 1))
    first.settle()   # a checkpoint after step 3
    again, out2 = sink(max_nonfinite=3)
    again.resume(first.window())
    feed(again, [(4, losses[3])])
    again.flush(4, 0, None)
    assert out[-1] == out2[-1] and out[-1]["loss"] == pytest.approx(7 / 3)
    # the non-finite run continues across the resume: steps 5, 6 and then 7 stop both
    for s in (whole, again):
        feed(s, [(5, math.nan), (6, math.nan)])
    again.settle()   # a checkpoint after step 6
    first2, _ = sink(max_nonfinite=3)
    first2.resume(again.window())
    with pytest.raises(NonFiniteLossError, match="steps 5-7"):
        first2.push(7, 0, metrics(math.nan))
        first2.settle()


def test_a_call_of_several_steps_is_logged_and_stopped_step_by_step():
    s, out = sink(max_nonfinite=3)
    losses = np.array([1.0, np.nan, 3.0, np.nan, 0, 0], np.float32)   # steps 1-4 of a (6,) buffer, n = 4
    s.push(4, 0, {"loss": losses, "accuracy": np.full(6, 0.5, np.float32),
                  "learning_rate": np.full(6, 1e-3, np.float32), "nonfinite": ~np.isfinite(losses)}, 4)
    s.flush(4, 0, None)
    assert [(r["step"], r.get("nonfinite", False)) for r in out] == [(2, True), (4, True), (4, False)]
    assert out[-1]["loss"] == pytest.approx(2.0)   # the finite steps 1 and 3
    bad = np.full(6, np.nan, np.float32)
    with pytest.raises(NonFiniteLossError, match="steps 4-6"):   # step 4 began the run; the third stops it, mid-call
        s.push(10, 0, {"loss": bad, "accuracy": bad, "learning_rate": bad, "nonfinite": np.ones(6, bool)}, 6)
        s.settle()
