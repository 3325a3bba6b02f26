"""Running the way Ray users do: a real local Ray head started with `ray start --head`, the
default job submitted with `ray job submit` (through launch/submit.sh, as the README says), and
platforms pinned to the nodes of a local multi-node cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL

BIN = Path(sys.executable).parent  # the environment's `ray` and `python`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own process group, on free ports; ended by its group id.
    Every port is a free one: the agents' defaults (52365 and others) are taken when another Ray
    instance runs on this machine, and the head then never accepts a job."""
    gcs, dashboard, client = _free_port(), _free_port(), _free_port()
    agents = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    logs = tmp_path_factory.mktemp("ray-head")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            *agents,
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=_env(),
        stdout=open(logs / "out.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:  # the job API answers once the dashboard is up
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=_env(), capture_output=True, text=True
        )
        if probe.returncode == 0:
            break
        if time.monotonic() > deadline or head.poll() is not None:
            os.killpg(head.pid, signal.SIGTERM)
            pytest.fail(f"ray start --head did not come up:\n{(logs / 'out.log').read_text()[-3000:]}")
        time.sleep(2)
    yield address
    # the head and everything it started: our process group (SIGTERM makes `ray start --block`
    # stop its processes one by one, ~10-30 s on 2 cores; nothing of this cluster needs to outlive it)
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)


def test_submitted_default_job_succeeds_and_writes_its_run_dir(ray_head, tmp_path):
    out = tmp_path / "job-run"
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "submit.sh"), *SMALL, f"output_dir={out}"],
        env={**_env(), "RAY_ADDRESS": ray_head},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # submit.sh finds the repository itself
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_federation_coordinator_runs_as_a_submitted_job(ray_head, tmp_path):
    """The coordinator of a federation of organisations as a Ray job (launch/submit.sh, as the
    deployment guide says): it drives a platform service — `fl-llm serve`, a process of its own —
    over mutual TLS."""
    import yaml

    from fl_llm.remote.tls import provision

    port = _free_port()
    fed = {"name": "job", "coordinator": {"name": "coordinator"},
           "platforms": [{"name": "fashion-mall", "address": f"127.0.0.1:{port}"}]}  # fmt: skip
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(fed))
    provision(tmp_path / "federation.yaml", tmp_path / "kits")
    one = [*SMALL, "data.num_platforms=1", "data.synthetic.train_examples=[160]", "server.rounds=1"]
    kit = tmp_path / "kits" / "fashion-mall"
    service = subprocess.Popen(
        [sys.executable, "-m", "fl_llm", "serve", *one, f"federation.bundle={kit}", f"serve.listen=127.0.0.1:{port}",
         f"client.state_dir={tmp_path / 'state'}"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    out = tmp_path / "coordinated"
    try:
        result = subprocess.run(
            ["bash", str(REPO / "launch" / "submit.sh"), *one, f"federation.bundle={tmp_path / 'kits' / 'coordinator'}",
             f"federation.platforms=[{{name: fashion-mall, address: '127.0.0.1:{port}'}}]", f"output_dir={out}"],
            env={**_env(), "RAY_ADDRESS": ray_head}, capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )  # fmt: skip
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["backend"] == "remote" and summary["rounds"] == 1
    assert (tmp_path / "state" / "checkpoints").is_dir()  # the platform's state: on its side


def test_submit_retries_while_the_job_agent_is_not_up(tmp_path):
    """Right after `ray start` the head answers "No available agent": submit.sh tries again; any
    other failure is final."""
    fake, count = tmp_path / "ray", tmp_path / "count"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f"n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}\n"
        'if [ "$FAIL" = other ]; then echo "RuntimeError: bad config" >&2; exit 1; fi\n'
        'if [ $n -lt 3 ]; then echo "RuntimeError: No available agent to submit job, please try again later.." >&2; exit 1; fi\n'
        "echo \"Job 'raysubmit_x' succeeded\"\n"
    )
    fake.chmod(0o755)
    ok = subprocess.run(
        ["bash", str(REPO / "launch" / "submit.sh")], env={**_env(), "RAY": str(fake)}, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "succeeded" in ok.stdout and count.read_text().strip() == "3"
    count.unlink()
    bad = subprocess.run(
        ["bash", str(REPO / "launch" / "submit.sh")],
        env={**_env(), "RAY": str(fake), "FAIL": "other"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "bad config" in bad.stdout and count.read_text().strip() == "1"


@pytest.fixture(scope="module")
def two_node_cluster():
    """A local multi-node Ray cluster (ray.cluster_utils): a head offering `site-a` and a second
    node offering `site-b`, each with its own raylet."""
    from ray.cluster_utils import Cluster

    dashboard_port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"site-a": 1},
            "include_dashboard": True,  # the state API (which node ran which actor) reads it
            "dashboard_port": dashboard_port,
        },
    )
    cluster.add_node(num_cpus=2, resources={"site-b": 1})
    cluster.wait_for_nodes()
    import ray

    ray.init(address=cluster.address, log_to_driver=False)  # the runs join this connection
    cluster.dashboard_port = dashboard_port
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_platforms_run_on_the_nodes_that_hold_their_data(two_node_cluster, tmp_path):
    import ray
    from ray.util.state import list_actors

    from fl_llm.config import load
    from fl_llm.errors import UserError
    from fl_llm.server.loop import run

    pins = (
        "ray.placement=[{platform: 0, resources: {site-a: 0.5}}, {platform: 1, resources: {site-b: 0.3}}, "
        "{platform: 2, resources: {site-b: 0.3}}]"
    )
    cfg = load(
        None, [*SMALL, "server.rounds=1", f"ray.address={two_node_cluster.address}", "ray.cpus_per_platform=0.3", pins]
    )
    summary = run(cfg, tmp_path / "pinned")
    assert summary["status"] == "completed"
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    placed = {}
    dashboard = f"http://127.0.0.1:{two_node_cluster.dashboard_port}"
    for actor in list_actors(address=dashboard, filters=[("class_name", "=", "Platform")], detail=True, limit=1000):
        if "platform-" in (actor.name or ""):
            placed[actor.name.split(":")[2]] = "site-a" if "site-a" in nodes[actor.node_id] else "site-b"
    assert placed == {"platform-0": "site-a", "platform-1": "site-b", "platform-2": "site-b"}

    absent = load(
        None,
        [*SMALL, f"ray.address={two_node_cluster.address}", "ray.placement=[{platform: 2, resources: {site-c: 1}}]"],
    )
    started = time.monotonic()
    with pytest.raises(UserError, match="platform 2 needs resource 'site-c'"):
        run(absent, tmp_path / "absent")
    assert time.monotonic() - started < 60  # fails fast instead of waiting for a node forever


def test_platforms_of_two_workers_meet_over_tcp_on_their_own_nodes(two_node_cluster, tmp_path):
    """Two nodes: each platform's two workers in a placement group on the node with its resource
    (each bundle a half of it), meeting through rank 0's TCP store (several nodes: no shared
    file); the run equals the one-worker run in this process."""
    import ray
    from ray.util.state import list_actors

    from fl_llm.config import load
    from fl_llm.server.loop import run
    from fl_llm.tracking import read_metrics

    small = ["data.num_platforms=2", "data.synthetic.train_examples=[64]", "data.synthetic.eval_examples=32"]
    small += ["client.local_steps=3", "client.batch_size=8", "server.rounds=2", "tracking.progress=false"]
    pins = "ray.placement=[{platform: 0, resources: {site-a: 1}}, {platform: 1, resources: {site-b: 1}}]"
    group = [f"ray.address={two_node_cluster.address}", "ray.workers_per_platform=2", "ray.cpus_per_worker=0.5"]
    run(load(None, [*small, *group, pins]), tmp_path / "two")
    run(load(None, [*small, "backend=local"]), tmp_path / "one")
    got, want = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [abs(a["eval_loss"] - b["eval_loss"]) < 1e-5 for a, b in zip(got, want)] == [True, True]
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    placed: dict = {}
    dashboard = f"http://127.0.0.1:{two_node_cluster.dashboard_port}"
    for cls in ("GroupLeader", "GroupWorker"):
        for actor in list_actors(address=dashboard, filters=[("class_name", "=", cls)], detail=True, limit=1000):
            site = "site-a" if "site-a" in nodes[actor.node_id] else "site-b"
            placed.setdefault(actor.name.split(":")[2], set()).add(site)
    assert placed == {"platform-0": {"site-a"}, "platform-1": {"site-b"}}
    assert len(got[-1]["platforms"]["gadget-hub"]["workers"]) == 2


def test_launch_files_are_what_the_readme_says():
    import yaml

    env = yaml.safe_load((REPO / "launch" / "runtime_env.yaml").read_text())
    assert ".venv" in env["excludes"] and "runs" in env["excludes"]
    submit = (REPO / "launch" / "submit.sh").read_text()
    assert "--working-dir . --runtime-env launch/runtime_env.yaml" in submit and "python -m fl_llm run" in submit
    cluster = yaml.safe_load((REPO / "launch" / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert any("pip install -e" in c for c in cluster["setup_commands"])
    job = yaml.safe_load((REPO / "launch" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m fl_llm run")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
