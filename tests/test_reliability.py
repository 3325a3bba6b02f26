"""Failures rehearsed on a real local Ray instance (one for this module): platform processes
killed from inside (os._exit) and outside (ray.kill), exceptions, stragglers, corrupted updates,
exclusion, round retries, and resuming a stopped run to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fl_llm.config import load
from fl_llm.server.loop import RunFailed, run
from fl_llm.tracking import read_metrics
from tests.conftest import REPO, SMALL, start_local_ray

NAMES = ["fashion-mall", "gadget-hub", "home-market"]  # the synthetic platforms, by index
STEPS = "client.local_steps=4"  # what these tests watch is the round, not the training in it
BASE = [*SMALL, "server.round_timeout_s=120"]


@pytest.fixture(scope="module")
def ray_instance():
    ray = start_local_ray()
    yield ray
    ray.shutdown()


def _run(path, *overrides, resume=False):
    cfg = load(None, [*BASE, *overrides])
    summary = run(cfg, path, resume=resume)
    return summary, read_metrics(path)


def _adapter_bytes(run_dir):
    return (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def _finite_adapter(run_dir):
    from safetensors.numpy import load_file

    return all(np.isfinite(v).all() for v in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).values())


@pytest.fixture(scope="module")
def faulty_run(ray_instance, tmp_path_factory):
    """One Ray run of 3 rounds (round_timeout_s=10), a fault in each: in round 1 fashion-mall is
    a straggler (an injected 120 s sleep); in round 2 gadget-hub's process exits while it trains
    (faults.kill: os._exit); in round 3 another process (an operator, a node failure) kills
    home-market's actor with ray.kill while it sleeps an injected 30 s. The tests below read it."""
    ray = ray_instance
    out = tmp_path_factory.mktemp("faulty") / "r"

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # round 3 has started: home-market is in its injected 30 s sleep
        (name,) = [a for a in ray.util.list_named_actors() if a.endswith(":platform-2:0")]
        ray.kill(ray.get_actor(name))

    t = threading.Thread(target=killer)
    t.start()
    summary, rows = _run(
        out,
        "server.rounds=3",
        STEPS,
        "server.round_timeout_s=10",
        "faults.delay=[{platform: 0, seconds: 120, rounds: [1]}, {platform: 2, seconds: 30, rounds: [3]}]",
        "faults.kill=[{platform: 1, round: 2}]",
    )
    t.join()
    return out, summary, rows


def test_straggler_is_left_out_and_carries_on(faulty_run):
    _, summary, rows = faulty_run
    assert rows[0]["late"] == [NAMES[0]] and not rows[0]["platforms"][NAMES[0]]["participated"]
    assert rows[0]["seconds"]["train"] < 20  # the round did not wait for the 120 s sleep
    assert rows[0]["platforms"][NAMES[1]]["participated"]
    assert rows[1]["platforms"][NAMES[0]]["participated"] and not rows[1]["late"]
    assert summary["failures"]["late"] == 1


def test_platform_process_exiting_mid_training(faulty_run):
    """faults.kill: os._exit inside the training loop. The round completes with the others; the
    platform gets a new process, which evaluates the round's model and trains the next round."""
    out, summary, rows = faulty_run
    assert [r["round"] for r in rows] == [1, 2, 3]
    r2 = rows[1]
    assert list(r2["failed"]) == [NAMES[1]] and "died" in r2["failed"][NAMES[1]]
    assert r2["restarted"] == [NAMES[1]]
    assert not r2["platforms"][NAMES[1]]["participated"] and r2["platforms"][NAMES[0]]["participated"]
    assert np.isfinite(r2["platforms"][NAMES[1]]["eval_loss"])  # the new process evaluates the round's model
    assert rows[2]["platforms"][NAMES[1]]["participated"] and NAMES[1] not in rows[2]["failed"]
    assert summary["failures"]["restarted"] == 2 and _finite_adapter(out)


def test_platform_killed_from_outside_with_ray_kill(faulty_run):
    """Found dead, not late: the round waited neither for the killed platform's sleep nor for
    the 10 s deadline."""
    _, summary, rows = faulty_run
    r3 = rows[2]
    assert list(r3["failed"]) == [NAMES[2]] and "died" in r3["failed"][NAMES[2]] and not r3["late"]
    assert r3["restarted"] == [NAMES[2]]
    assert r3["seconds"]["train"] < 8
    assert np.isfinite(r3["platforms"][NAMES[2]]["eval_loss"])  # its new process answers
    assert summary["failures"]["failed"] == 2


def test_corrupted_updates_are_rejected_before_aggregation(tmp_path):
    """Driver policy, so the in-process backend is enough (and quick)."""
    summary, rows = _run(
        tmp_path / "r",
        "backend=local",
        "server.rounds=2",
        "server.max_update_norm=100",
        "faults.corrupt=[{platform: 0, rounds: [1], kind: nan}, {platform: 1, rounds: [1], kind: scale, factor: 1000}, "
        "{platform: 2, rounds: [2], kind: shape}]",
    )
    first, second = rows[0]["rejected"], rows[1]["rejected"]
    assert sorted(first) == NAMES[:2] and list(second) == [NAMES[2]]
    assert "NaN" in first[NAMES[0]] and "max_update_norm" in first[NAMES[1]] and "shape" in second[NAMES[2]]
    assert [n for n, p in rows[0]["platforms"].items() if p["participated"]] == [NAMES[2]]
    assert [n for n, p in rows[1]["platforms"].items() if p["participated"]] == NAMES[:2]
    assert all(np.isfinite(r["eval_loss"]) for r in rows)
    assert summary["failures"]["rejected"] == 3 and _finite_adapter(tmp_path / "r")


def test_exceptions_count_toward_exclusion(tmp_path):
    summary, rows = _run(
        tmp_path / "r",
        "backend=local",
        "server.rounds=2",
        "server.max_failures=1",
        "faults.error=[{platform: 2, round: 1}]",
    )
    assert "injected error" in rows[0]["failed"][NAMES[2]] and rows[0]["restarted"] == []  # alive: no restart
    assert list(rows[0]["excluded"]) == [NAMES[2]] and "1 rounds in a row" in rows[0]["excluded"][NAMES[2]]
    assert NAMES[2] not in rows[1]["cohort"] and NAMES[2] not in rows[1]["active"]
    assert "eval_loss" not in rows[1]["platforms"][NAMES[2]]  # out of the federation: not evaluated
    assert list(summary["excluded"]) == [NAMES[2]]


def test_too_few_updates_retry_the_round(tmp_path):
    _, rows = _run(
        tmp_path / "retry",
        "backend=local",
        "server.rounds=1",
        "server.min_platforms=3",
        "faults.kill=[{platform: 0, round: 1}]",
    )
    (row,) = rows
    assert len(row["attempts"]) == 1 and NAMES[0] in row["attempts"][0]["failed"]
    assert all(p["participated"] for p in row["platforms"].values())  # the retry had everyone


FOUR_ROUNDS = ["server.rounds=4", STEPS]


@pytest.fixture(scope="module")
def uninterrupted(ray_instance, tmp_path_factory):
    """The reference: 4 rounds, never stopped."""
    path = tmp_path_factory.mktemp("uninterrupted")
    _, rows = _run(path, *FOUR_ROUNDS)
    return path, rows


def test_stopped_run_resumes_to_the_same_adapter_bytes(uninterrupted, tmp_path):
    """Round 3 cannot go on (a platform dies, all are required, too_few=stop): the run stops with
    the reason; resumed without the fault it ends exactly where the uninterrupted run did."""
    full_dir, full = uninterrupted
    stop = [*FOUR_ROUNDS, "server.min_platforms=3", "server.too_few=stop", "faults.kill=[{platform: 0, round: 3}]"]
    stop.append("backend=local")  # stopping and resuming are the driver's: in-process platforms
    # suffice, and their bytes equal the Ray run's
    with pytest.raises(RunFailed, match="round 3: fewer than server.min_platforms"):
        _run(tmp_path / "cut", *stop)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "failed" and "round 3" in summary["error"] and summary["rounds"] == 2
    assert [r["round"] for r in read_metrics(tmp_path / "cut")] == [1, 2]
    assert (tmp_path / "cut" / "checkpoints" / "round-00002").is_dir()
    cfg = load(tmp_path / "cut" / "config.yaml", ["faults.kill=[]"])
    summary = run(cfg, tmp_path / "cut", resume=True)
    rows = read_metrics(tmp_path / "cut")
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and summary["rounds"] == 4
    assert _adapter_bytes(tmp_path / "cut") == _adapter_bytes(full_dir)
    for a, b in zip(rows, full):
        assert a["eval_loss"] == b["eval_loss"] and a["auc"] == b["auc"]


def test_driver_killed_mid_run_resumes_to_the_same_bytes(ray_instance, uninterrupted, tmp_path):
    """The acceptance scenario: SIGKILL the `fl-llm run` driver process mid-run (its platform
    actors die with it), then `fl-llm run --resume RUN_DIR`: the final adapter is byte-identical.
    Both runs join this module's Ray instance by address, as a job on a cluster does (two more
    local Ray starts would cost this test half its time)."""
    full_dir, _ = uninterrupted
    address = ray_instance.get_runtime_context().gcs_address
    overrides = [*BASE, *FOUR_ROUNDS, f"ray.address={address}"]
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "fl_llm", "run", *overrides, f"output_dir={out}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (its own process group)
        proc.wait()
    assert 2 <= len(read_metrics(out)) < 4
    resumed = subprocess.run(
        [sys.executable, "-m", "fl_llm", "run", "--resume", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round" in resumed.stdout
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert _adapter_bytes(out) == _adapter_bytes(full_dir)
