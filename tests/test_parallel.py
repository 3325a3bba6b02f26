"""A platform bigger than one device (ray.workers_per_platform): its workers in one placement
group, joined by torch.distributed (gloo here), each step's batch split over them. The driver
must see the same platform: the same losses and the same adapter as one worker taking the whole
batch (DDP and FSDP), record-level DP's noise drawn once per platform step, and a worker that
dies restarts its whole platform. One local Ray instance for the module."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.config import load
from fl_llm.errors import UserError
from fl_llm.server.loop import run
from fl_llm.tracking import read_metrics
from tests.conftest import start_local_ray

# two platforms, 8-example steps split over 2 workers: small enough for 2 cores
BASE = [
    "data.num_platforms=2",
    "data.synthetic.train_examples=[64]",
    "data.synthetic.eval_examples=32",
    "client.local_steps=3",
    "client.batch_size=8",
    "server.rounds=2",
    "server.round_timeout_s=300",
    "tracking.progress=false",
]
NAMES = ["fashion-mall", "gadget-hub"]


@pytest.fixture(scope="module")
def ray_instance():
    ray = start_local_ray(4)
    yield ray
    ray.shutdown()


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _run(path, *overrides):
    run(load(None, [*BASE, *overrides]), path)
    return read_metrics(path), _adapter(path)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The reference: each platform one process taking the whole batch (in-process backend)."""
    return _run(tmp_path_factory.mktemp("one") / "r", "backend=local")


def _assert_same(got, want, tol=1e-5):
    (rows, adapter), (ref_rows, ref_adapter) = got, want
    assert [r["round"] for r in rows] == [r["round"] for r in ref_rows]
    for r, ref in zip(rows, ref_rows):
        assert abs(r["eval_loss"] - ref["eval_loss"]) < tol
        assert abs(r["train_loss"] - ref["train_loss"]) < tol
        for name in NAMES:
            assert abs(r["platforms"][name]["train_loss"] - ref["platforms"][name]["train_loss"]) < tol
    assert set(adapter) == set(ref_adapter)
    worst = max(float(np.max(np.abs(adapter[k] - ref_adapter[k]))) for k in adapter)
    assert worst < tol, worst


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_workers_train_the_platform_one_worker_would(ray_instance, tmp_path, one_worker, mode):
    """2 platforms x 2 workers = 2 platforms x 1 worker on the same global batch (client.batch_size
    is the platform's), loss and adapter to 1e-5; the metrics name each worker and its share."""
    got = _run(tmp_path / "r", "ray.workers_per_platform=2", f"client.parallel={mode}")
    _assert_same(got, one_worker)
    rows, _ = got
    p = rows[-1]["platforms"]["fashion-mall"]
    assert len(p["workers"]) == 2 and len({w["worker"] for w in p["workers"]}) == 2
    assert [w["tokens"] for w in p["workers"]] == [p["tokens"] // 2] * 2  # 4 of each 8 examples, same length
    assert all(w["tokens_per_s"] > 0 and w["peak_memory_bytes"] > 0 for w in p["workers"])
    assert p["peak_memory_bytes"] == max(w["peak_memory_bytes"] for w in p["workers"])


def test_fsdp_packed_fedprox_steps_match_one_worker(ray_instance, tmp_path, tmp_path_factory):
    """Packing calls the base's parts, not the base, so FSDP's root is gathered by hand there;
    FedProx's proximal gradient goes onto each worker's shard once (a term computed on sharded
    weights on one worker alone would wait for the others forever)."""
    pack = ["client.pack_length=256", "strategy.name=fedprox", "strategy.mu=0.5"]
    want = _run(tmp_path_factory.mktemp("one_packed") / "r", "backend=local", *pack)
    got = _run(tmp_path / "r", "ray.workers_per_platform=2", "client.parallel=fsdp", *pack)
    _assert_same(got, want)


def test_record_level_dp_adds_the_noise_once_per_platform_step(ray_instance, tmp_path):
    """Each worker clips its share of the Poisson batch; rank 0 alone draws the noise. With the
    noise seeded (secure_rng=false) the 2-worker update is the 1-worker one — noise added by
    each worker would make it differ by a second draw of the same size. (FedProx's term, which
    has no data in it, goes on after the workers' sum, on every worker.)"""
    dp = ["privacy.dp.level=record", "privacy.dp.noise_multiplier=1.0", "privacy.dp.secure_rng=false"]
    dp += ["privacy.dp.clip_norm=0.05", "server.rounds=1", "strategy.name=fedprox", "strategy.mu=0.5"]
    want = _run(tmp_path / "one", "backend=local", *dp)
    got = _run(tmp_path / "two", "ray.workers_per_platform=2", *dp)
    _, adapter = got
    _, ref = want
    worst = max(float(np.max(np.abs(adapter[k] - ref[k]))) for k in adapter)
    # the noise's share of a coordinate: z·C / (q·N) times the step size — far above 1e-5
    assert worst < 1e-5, worst


def test_a_worker_that_dies_restarts_its_platform(ray_instance, tmp_path):
    """Worker 1 of platform 1 exits mid-training in round 2: its peer's collective fails at once,
    the platform (both workers) fails that round as one platform and comes back whole."""
    kill = "faults.kill=[{platform: 1, round: 2, worker: 1}]"
    rows, adapter = _run(tmp_path / "r", "ray.workers_per_platform=2", "server.rounds=3", kill)
    assert [r["round"] for r in rows] == [1, 2, 3]
    r2 = rows[1]
    assert list(r2["failed"]) == [NAMES[1]] and "worker" in r2["failed"][NAMES[1]]
    assert r2["restarted"] == [NAMES[1]]
    assert rows[2]["platforms"][NAMES[1]]["participated"]
    assert len(rows[2]["platforms"][NAMES[1]]["workers"]) == 2
    assert all(np.isfinite(v).all() for v in adapter.values())


def test_a_group_that_cannot_be_placed_is_a_user_error(ray_instance, tmp_path):
    """More CPUs per worker than the cluster has: a user error naming what is missing, before a
    platform starts."""
    cfg = load(None, [*BASE, "ray.workers_per_platform=2", "ray.cpus_per_worker=2"])
    with pytest.raises(UserError, match=r"2 platforms x 2 workers x \(2 CPU, 0 GPU\) do not fit the cluster's 4 CPUs"):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend=local"], "needs backend=ray"),
        (["ray.platforms_per_gpu=2"], "platforms_per_gpu=1"),
        (["client.batch_size=1"], "must not exceed client.batch_size"),
        (["client.parallel=fsdp", "privacy.dp.level=record", "privacy.target_epsilon=8"], "must be ddp"),
    ],
)
def test_settings_a_group_cannot_honour_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load(None, [*BASE, "ray.workers_per_platform=2", *overrides])


def test_group_placement_splits_a_platform_over_its_workers():
    from fl_llm.server.placement import group_placement

    cfg = load(None, [*BASE, "ray.workers_per_platform=2"])
    assert group_placement(cfg, {"CPU": 2.0}) == (0.5, 0.0)  # 4 workers share 2 CPUs
    assert group_placement(cfg, {"CPU": 16.0, "GPU": 4.0}) == (1.0, 1.0)
    cfg = load(None, [*BASE, "ray.workers_per_platform=2", "ray.gpus_per_platform=2"])
    assert group_placement(cfg, {"CPU": 16.0, "GPU": 4.0}) == (1.0, 1.0)
    with pytest.raises(UserError, match="no GPU"):
        group_placement(cfg, {"CPU": 16.0})


def _resident(rank: int, world: int, store: str, overrides: list[str], out: dict) -> None:
    import torch

    from fl_llm.client.model_setup import build_model
    from fl_llm.client.parallel import join, resident_parameter_bytes, shard_model

    torch.set_num_threads(1)
    cfg = load(None, overrides)
    group = join({"file": store}, rank, world, "fsdp", torch.device("cpu"))
    model, _, _ = build_model(cfg, 0, cfg.model.lora.r, torch.device("cpu"), None)
    whole = resident_parameter_bytes(model)  # what a DDP worker holds
    shard_model(model, group)
    out[rank] = (whole, resident_parameter_bytes(model))


def test_fsdp_holds_about_one_nth_of_the_parameters_per_worker(tmp_path):
    """The memory FSDP exists for: each of 2 workers holds about half of a 27M-parameter model's
    weights (DDP: all of them). Measured on the parameters each process keeps resident."""
    import torch.multiprocessing as mp

    shape = ["model.tiny.hidden_size=512", "model.tiny.num_layers=8", "model.tiny.intermediate_size=1376"]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_resident, args=(2, str(tmp_path / "store"), shape, out), nprocs=2)
        got = dict(out)
    whole, sharded = got[0]
    assert got[1][0] == whole and whole > 80e6  # 4-byte weights
    ratio = max(got[0][1], got[1][1]) / whole
    print(
        f"resident parameter bytes per worker: DDP {whole / 2**20:.1f} MiB, FSDP x2 "
        f"{got[0][1] / 2**20:.1f} / {got[1][1] / 2**20:.1f} MiB (ratio {ratio:.3f})"
    )
    assert 0.45 < ratio < 0.55


def test_bench_measures_one_platform_over_its_workers(ray_instance, tmp_path, capsys):
    """`fl-llm bench --workers 1,2` on a config of three platforms: the first one's tokens/s on
    1 and 2 workers, each worker's figures, and the scaling efficiency (1 at N=1 by definition)."""
    import json

    from fl_llm.cli import main

    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "data.synthetic.train_examples=[32,24,16]",
        "data.synthetic.eval_examples=10",
        "client.local_steps=2",
    ]
    assert main([*argv, "client.batch_size=8", "--workers=1,2", "--rounds=2", f"--out={out}"]) == 0
    got = json.loads(out.read_text())["scaling"]
    assert set(got["workers"]) == {"1", "2"} and got["workers"]["1"]["efficiency"] == 1.0
    two = got["workers"]["2"]
    assert len(two["per_worker_tokens_per_s"]) == 2 and all(t > 0 for t in two["per_worker_tokens_per_s"])
    assert "N=2" in capsys.readouterr().out
    assert main([*argv, "--workers=0,2"]) == 2
