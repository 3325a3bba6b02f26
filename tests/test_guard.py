"""Reliability building blocks without a cluster: update checks, the failure policy, fault
injection, checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fl_llm import checkpoint, faults
from fl_llm.config import load
from fl_llm.server.guard import Failures, check_update, update_norm

REF = {"a.lora_A.weight": np.zeros((2, 3), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}


def _update(scale=1.0):
    return {k: np.full(v.shape, scale, np.float32) for k, v in REF.items()}


def test_a_good_update_passes():
    assert check_update(_update(), REF) is None
    assert check_update(_update(), REF, max_norm=update_norm(_update()) + 1e-6) is None


@pytest.mark.parametrize("kind, words", [("nan", "NaN/Inf"), ("inf", "NaN/Inf"), ("shape", "shape"), ("keys", "keys")])
def test_every_corruption_is_rejected_with_its_reason(kind, words):
    bad = faults.corrupt(_update(), kind)
    why = check_update(bad, REF)
    assert why is not None and words in why


def test_norm_bound_and_wrong_types_are_rejected():
    big = faults.corrupt(_update(0.1), "scale", factor=1000)
    assert update_norm(big) == pytest.approx(1000 * update_norm(_update(0.1)), rel=1e-5)
    assert "max_update_norm" in check_update(big, REF, max_norm=10.0)
    assert check_update(big, REF) is None  # no bound configured: only shape and finiteness count
    wrong_dtype = {k: v.astype(np.float64) for k, v in _update().items()}
    assert "dtype" in check_update(wrong_dtype, REF)
    assert "mapping" in check_update([1, 2], REF)
    assert "array" in check_update({k: v.tolist() for k, v in _update().items()}, REF)


def test_corrupt_does_not_touch_its_input():
    u = _update()
    faults.corrupt(u, "nan")
    assert check_update(u, REF) is None


def test_failures_in_a_row_exclude_and_success_resets():
    f = Failures(max_in_a_row=2)
    assert f.record([0, 1, 2], {0, 2}, {1: "boom"}) == {}
    assert f.record([0, 1, 2], {0, 1, 2}, {}) == {}  # platform 1 recovered: count back to 0
    assert f.record([0, 1, 2], {0, 2}, {1: "boom"}) == {}
    newly = f.record([1, 2], {2}, {1: "late"})
    assert list(newly) == [1] and "2 rounds in a row" in newly[1] and "late" in newly[1]
    assert f.active([0, 1, 2]) == [0, 2]
    assert f.record([0, 2], {0, 2}, {}) == {}  # excluded once, reported once
    restored = Failures.from_state(2, json.loads(json.dumps(f.state())))
    assert restored == f


def test_fault_schedule_reads_the_config():
    cfg = load(
        None,
        [
            "faults.kill=[{platform: 1, round: 3}]",
            "faults.error=[{platform: 2, round: 1}]",
            "faults.delay=[{platform: 0, seconds: 2.5, rounds: [2, 4]}, {platform: 1, seconds: 1}]",
            "faults.corrupt=[{platform: 2, rounds: [5], kind: shape}, {platform: 1, kind: scale, factor: 100}]",
        ],
    ).faults
    assert faults.should_kill(cfg, 1, 3, attempt=0) and not faults.should_kill(cfg, 1, 3, attempt=1)
    assert not faults.should_kill(cfg, 0, 3, attempt=0)
    assert faults.should_error(cfg, 2, 1, 0) and not faults.should_error(cfg, 2, 2, 0)
    assert faults.delay_seconds(cfg, 0, 2) == 2.5 and faults.delay_seconds(cfg, 0, 3) == 0
    assert faults.delay_seconds(cfg, 1, 7) == 1  # no rounds listed: every round
    assert faults.corruption(cfg, 2, 5).kind == "shape" and faults.corruption(cfg, 2, 4) is None
    every = faults.corruption(cfg, 1, 9)  # no rounds listed: every round
    assert every.kind == "scale" and every.factor == 100


def test_noise_poisoning_is_finite_and_much_larger():
    bad = faults.corrupt(_update(0.1), "noise", factor=100, seed=3)
    assert check_update(bad, REF) is None  # well-formed: only a robust rule can tell
    assert update_norm(bad) == pytest.approx(100 * update_norm(_update(0.1)), rel=0.5)


def test_checkpoint_round_trips_nested_state_exactly(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "global_state": {"x.weight": rng.normal(size=(4, 3)).astype(np.float32)},
        "strategy_state": {"m": {"x.weight": rng.normal(size=(4, 3)).astype(np.float32)}, "t": 3},
        "platform_state": {"1": {"c": np.arange(5, dtype=np.float64)}},
        "names": ["a", "b"],
        "elapsed_s": 1.5,
    }
    path = checkpoint.save(tmp_path / "ckpt", 7, state)
    assert path.name == "round-00007"
    rnd, back = checkpoint.load(path)
    assert rnd == 7 and back["names"] == ["a", "b"] and back["strategy_state"]["t"] == 3
    for a, b in [
        (state["global_state"]["x.weight"], back["global_state"]["x.weight"]),
        (state["strategy_state"]["m"]["x.weight"], back["strategy_state"]["m"]["x.weight"]),
        (state["platform_state"]["1"]["c"], back["platform_state"]["1"]["c"]),
    ]:
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_checkpoints_keep_the_newest_and_ignore_half_written_ones(tmp_path):
    root = tmp_path / "ckpt"
    for r in range(1, 5):
        checkpoint.save(root, r, {"r": r}, keep=2)
    assert [p.name for p in checkpoint.all_checkpoints(root)] == ["round-00003", "round-00004"]
    # a crash mid-write leaves a temp dir: never taken for a checkpoint, swept by the next save
    (root / ".tmp-round-00005-x").mkdir()
    (root / ".tmp-round-00005-x" / "state.json").write_text("{")
    assert checkpoint.latest(root).name == "round-00004"
    checkpoint.save(root, 5, {"r": 5}, keep=2)
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    assert checkpoint.load(checkpoint.latest(root)) == (5, {"r": 5})


def test_checkpoint_write_is_a_rename(tmp_path, monkeypatch):
    """If the process dies before the rename, no round-* directory exists."""
    root = tmp_path / "ckpt"

    def die(src, dst):
        raise KeyboardInterrupt("killed before rename")

    monkeypatch.setattr(os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(root, 1, {"x": np.ones(3)})
    assert checkpoint.latest(root) is None


def test_a_frozen_checkpoint_is_the_state_when_frozen(tmp_path):
    """The writer thread writes a snapshot: the driver's later changes to the state's containers
    (the next round's history line, a new base merge, a replaced global adapter) do not reach it."""
    state = {"history": [{"round": 1}], "global_state": {"x": np.ones(3, np.float32)}, "merges": [], "round": 1}
    frozen = checkpoint.freeze(state)
    state["history"].append({"round": 2})
    state["merges"].append({"x": np.zeros(1)})
    state["global_state"]["x"] = np.full(3, 7.0, np.float32)
    state["round"] = 2
    _, back = checkpoint.load(checkpoint.write(tmp_path, 1, frozen))
    assert back["history"] == [{"round": 1}] and back["merges"] == [] and back["round"] == 1
    assert back["global_state"]["x"].tolist() == [1.0, 1.0, 1.0]


def test_round_writer_keeps_order_and_raises_a_failed_write_on_the_driver(tmp_path):
    import threading
    import time

    from fl_llm.server.writer import RoundWriter

    done, release = [], threading.Event()
    writer = RoundWriter()
    writer.submit(lambda: (release.wait(5), done.append(1)))
    assert done == []  # the driver went on while round 1 was being written
    release.set()
    writer.submit(lambda: done.append(2))  # waits for round 1 first: at most one round pending
    assert done[0] == 1
    writer.wait()
    assert done == [1, 2]

    def broken():
        time.sleep(0.05)
        raise OSError("disk full")

    writer.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: done.append(3))
    assert done == [1, 2]  # nothing after a failed write
    writer.close()
