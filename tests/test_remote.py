"""A federation of organisations on loopback: `fl-llm provision`, three platform services
(`fl-llm serve`; in this process to spare the CPU, one of them backed by its own Ray instance, one
a real subprocess) and a coordinator driving them over mutual TLS — the same result as the
single-organisation run, and a service that refuses what it must and survives what it receives."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from fl_llm.remote import wire
from fl_llm.tracking import read_metrics
from tests.conftest import REPO, SMALL

NAMES = ["fashion-mall", "gadget-hub", "home-market"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _provision(root, ports, name="shops"):
    from fl_llm.remote.tls import provision

    root.mkdir(parents=True, exist_ok=True)
    fed = {
        "name": name,
        "coordinator": {"name": "coordinator"},
        "platforms": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in zip(NAMES, ports)],
    }
    (root / "federation.yaml").write_text(yaml.safe_dump(fed))
    provision(root / "federation.yaml", root / "kits")
    return root / "kits"


def _platforms(ports) -> str:
    return (
        "federation.platforms=["
        + ", ".join(f"{{name: {n}, address: '127.0.0.1:{p}'}}" for n, p in zip(NAMES, ports))
        + "]"
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three services in this process (platform 1 on its own local Ray instance), and their kits."""
    import ray

    from fl_llm.config import load
    from fl_llm.remote.service import PlatformService
    from fl_llm.remote.tls import load_bundle
    from fl_llm.remote.transport import start_server
    from fl_llm.server.backends import start_ray

    root = tmp_path_factory.mktemp("federation")
    ports = [_free_port() for _ in NAMES]
    kits = _provision(root, ports)
    start_ray(load(None, ["ray.num_cpus=1"]))  # as `fl-llm serve` does: before any gRPC thread runs
    servers, services = [], []
    for i, name in enumerate(NAMES):
        own = load(None, [*SMALL, f"federation.bundle={kits / name}", f"client.state_dir={root / 'state' / name}",
                          f"serve.listen=127.0.0.1:{ports[i]}", *(["serve.backend=ray", "ray.num_cpus=1"] if i == 1 else [])])  # fmt: skip
        creds = load_bundle(kits / name)
        service = PlatformService(own, creds.name, creds.federation.coordinator, i)
        servers.append(start_server(service, creds, own.serve.listen)[0])
        services.append(service)
    yield {"root": root, "kits": kits, "ports": ports, "services": services}
    for s in servers:
        s.stop(grace=0)
    ray.shutdown()


def _coordinator(federation, *extra, ports=None):
    where = _platforms(ports or federation["ports"])
    return [*SMALL, f"federation.bundle={federation['kits'] / 'coordinator'}", where, *extra]


# --- the wire format ----------------------------------------------------------------------------


def test_wire_round_trips_exactly_and_refuses_what_it_does_not_know():
    msg = {
        "state": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], dtype=np.int8)},
        "scalar": np.float32(0.1),
        "n": 3,
        "x": 0.1,
        "none": None,
        "flags": [True, False],
        "key": b"\x00\x01secret",
        "nested": [{"deep": (1, 2)}],
        "shares": {0: b"s0", 2: {"x": np.ones(1, np.uint64)}},
    }
    back = wire.decode(wire.encode(msg), 1 << 20)
    assert back["state"]["a"].dtype == np.float32 and np.array_equal(back["state"]["a"], msg["state"]["a"])
    assert back["state"]["b"].tobytes() == msg["state"]["b"].tobytes()
    assert type(back["scalar"]) is np.float32 and back["scalar"] == msg["scalar"]
    assert back["key"] == msg["key"] and back["nested"] == [{"deep": [1, 2]}] and back["x"] == 0.1
    assert back["shares"][0] == b"s0" and back["shares"][2]["x"].dtype == np.uint64
    for bad in (np.array([1j]), object(), {1: 2, "a": 3}, {"$t": "t0"}, {"$i": [1]}):
        with pytest.raises(wire.WireError):
            wire.encode({"v": bad})
    good = wire.encode({"a": np.zeros(3, np.float32)})
    for data, why in [
        (b"", "magic"),
        (b"XXXX" + good[4:], "magic"),
        (good[:-3], "safetensors"),
        (good[:10], "truncated"),
        (good, "over the limit"),
    ]:
        with pytest.raises(wire.WireError, match=why):
            wire.decode(data, len(good) - 1 if why == "over the limit" else 1 << 20)
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(wire.WireError, match="deeper"):
        wire.decode(wire.MAGIC + len(json.dumps(deep)).to_bytes(4, "little") + json.dumps(deep).encode(), 1 << 20)


def test_provision_makes_a_kit_per_party_and_never_overwrites_one(tmp_path):
    from cryptography import x509

    from fl_llm.errors import UserError
    from fl_llm.remote.tls import load_bundle

    kits = _provision(tmp_path / "f", [7001, 7002, 7003])
    assert sorted(p.name for p in kits.iterdir()) == sorted(["ca", "coordinator", *NAMES])
    for party in ["coordinator", *NAMES]:
        creds = load_bundle(kits / party)
        cert = x509.load_pem_x509_certificate(creds.cert)
        assert creds.name == party and cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName) == [party]
        assert oct((kits / party / "key.pem").stat().st_mode)[-3:] == "600"
        assert not (kits / party / "ca.key").exists()
    with pytest.raises(UserError, match="not empty"):
        _provision(tmp_path / "f", [7001, 7002, 7003])
    (tmp_path / "bad.yaml").write_text("platforms: [{name: Shop_A, address: 'h:1'}]\n")
    from fl_llm.remote.tls import provision

    with pytest.raises(UserError, match="DNS label"):
        provision(tmp_path / "bad.yaml", tmp_path / "out")


# --- the federation -----------------------------------------------------------------------------


def test_remote_platforms_give_the_single_organisation_result(federation, tmp_path):
    """The same job over three services (one on its own Ray) and on the in-process backend: the
    same eval loss every round and the same adapter bytes; the bytes that crossed the network per
    round within 10% of the adapter traffic the run reports."""
    from fl_llm.config import load
    from fl_llm.server.loop import run

    remote = run(load(None, _coordinator(federation)), tmp_path / "remote")
    run(load(None, [*SMALL, "backend=local"]), tmp_path / "single")
    a, b = read_metrics(tmp_path / "remote"), read_metrics(tmp_path / "single")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=1e-6)
        adapter = x["bytes_up"] + x["bytes_down"]
        assert abs(sum(x["wire_bytes"].values()) - adapter) / adapter < 0.10, (x["wire_bytes"], adapter)
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "remote" / adapter).read_bytes() == (tmp_path / "single" / adapter).read_bytes()
    assert remote["backend"] == "remote" and set(remote["policies"]) == set(NAMES)
    for name in NAMES:  # each platform's state stayed on its own disk, not in the coordinator's run dir
        assert (federation["root"] / "state" / name / "checkpoints").is_dir()
    assert not (tmp_path / "remote" / "platforms").exists()


def test_secure_aggregation_with_int8_crosses_the_network_unchanged(federation, tmp_path):
    """Keys, encrypted shares, masked ring elements and the unmasking shares all go through the
    wire format: the same result as the in-process secure run."""
    from fl_llm.config import load
    from fl_llm.server.loop import run

    secure = ["privacy.secagg.enabled=true", "compression.name=int8", "server.rounds=1"]
    run(load(None, _coordinator(federation, *secure)), tmp_path / "remote")
    run(load(None, [*SMALL, *secure, "backend=local"]), tmp_path / "single")
    (a,), (b,) = read_metrics(tmp_path / "remote"), read_metrics(tmp_path / "single")
    assert a["secagg"]["parties"] == 3 and a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-6)
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "remote" / adapter).read_bytes() == (tmp_path / "single" / adapter).read_bytes()


def test_a_stopped_coordinator_resumes_to_the_same_bytes(federation, tmp_path):
    """Platform 2's own service fails its round 2 (its faults.error), the job needs all three and
    stops; resumed against a new service for platform 2 at another address (federation.* may
    change on resume), it ends with the adapter an uninterrupted in-process run ends with."""
    from fl_llm.config import load
    from fl_llm.remote.service import PlatformService
    from fl_llm.remote.tls import load_bundle
    from fl_llm.remote.transport import start_server
    from fl_llm.server.loop import RunFailed, run

    creds = load_bundle(federation["kits"] / NAMES[2])
    servers, ports = [], []
    for faults in (["faults.error=[{platform: 2, round: 2}]"], []):
        own = load(None, [*SMALL, f"client.state_dir={tmp_path / 'state'}", *faults])
        ports.append(_free_port())
        service = PlatformService(own, NAMES[2], "coordinator", 2)
        servers.append(start_server(service, creds, f"127.0.0.1:{ports[-1]}")[0])
    job = ["server.rounds=3", "client.local_steps=3", "server.min_platforms=3", "server.too_few=stop"]
    try:
        first = _coordinator(federation, *job, ports=[*federation["ports"][:2], ports[0]])
        with pytest.raises(RunFailed, match="round 2"):
            run(load(None, first), tmp_path / "remote")
        cfg = load(tmp_path / "remote" / "config.yaml", [_platforms([*federation["ports"][:2], ports[1]])])
        summary = run(cfg, tmp_path / "remote", resume=True)
    finally:
        for s in servers:
            s.stop(grace=0)
    assert summary["rounds"] == 3 and [r["round"] for r in read_metrics(tmp_path / "remote")] == [1, 2, 3]
    run(load(None, [*SMALL, *job, "backend=local"]), tmp_path / "single")
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "remote" / adapter).read_bytes() == (tmp_path / "single" / adapter).read_bytes()


def test_wrong_ca_plaintext_and_wrong_party_are_refused(federation, tmp_path):
    import grpc

    from fl_llm.remote.service import SERVICE
    from fl_llm.remote.tls import load_bundle
    from fl_llm.remote.transport import Channel

    port = federation["ports"][0]
    hello = wire.encode({"job": "x", "config": {}})
    other = _provision(tmp_path / "other", federation["ports"])  # the same names, another CA
    for creds in (load_bundle(other / "coordinator"), load_bundle(federation["kits"] / NAMES[2])):
        ch = Channel(creds, NAMES[0], f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError) as e:
            ch.call("describe", hello, 10, 1 << 20)
        ch.close()
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED)
        if creds.name == NAMES[2]:  # the federation's CA, but a platform, not the coordinator
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "coordinator" in e.value.details()
    plain = grpc.insecure_channel(f"127.0.0.1:{port}")
    with pytest.raises(grpc.RpcError) as e:
        list(plain.stream_stream(f"/{SERVICE}/describe")(iter([hello]), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()
    # the coordinator dials platform 0's address expecting platform 1: that certificate is refused
    ch = Channel(load_bundle(federation["kits"] / "coordinator"), NAMES[1], f"127.0.0.1:{port}")
    with pytest.raises(grpc.RpcError) as e:
        ch.call("describe", hello, 10, 1 << 20)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()


def test_a_policy_that_requires_dp_refuses_a_job_without_it(federation, tmp_path, capsys):
    from fl_llm.cli import main
    from fl_llm.config import load
    from fl_llm.remote.service import PlatformService
    from fl_llm.remote.tls import load_bundle
    from fl_llm.remote.transport import start_server

    name, port = NAMES[2], _free_port()
    own = load(None, [*SMALL, f"client.state_dir={tmp_path / 'state'}", "serve.policy.require=[record_dp]",
                      "serve.policy.max_epsilon=8"])  # fmt: skip
    creds = load_bundle(federation["kits"] / name)
    server, _ = start_server(PlatformService(own, name, "coordinator", 2), creds, f"127.0.0.1:{port}")
    ports = [*federation["ports"][:2], port]
    try:
        args = [*SMALL, f"federation.bundle={federation['kits'] / 'coordinator'}", _platforms(ports)]
        assert main(["run", *args, f"output_dir={tmp_path / 'refused'}"]) == 2
        err = capsys.readouterr().err
        assert f"platform {name!r} refuses the job: its policy requires record-level DP" in err
        assert not (tmp_path / "refused").exists()  # refused before anything was written
        # with record-level DP (z = 1, one round of 2 steps: ε well under 8) it is accepted, and books it
        ok = ["privacy.dp.level=record", "privacy.dp.noise_multiplier=1", "server.rounds=1", "client.local_steps=2"]
        assert main(["run", *args, *ok, f"output_dir={tmp_path / 'accepted'}"]) == 0
        ledger = json.loads((tmp_path / "state" / "privacy_ledger.json").read_text())
        assert [(e["round"], e["steps"], e["noise"]) for e in ledger] == [(1, 2, 1.0)]
        summary = json.loads((tmp_path / "accepted" / "summary.json").read_text())
        assert summary["policies"][name]["require"] == ["record_dp"]
    finally:
        server.stop(grace=0)


def test_replayed_rounds_and_out_of_order_steps_get_an_error_reply(federation):
    import grpc

    from fl_llm.config import load, to_dict
    from fl_llm.remote.tls import load_bundle
    from fl_llm.remote.transport import Channel

    ch = Channel(load_bundle(federation["kits"] / "coordinator"), NAMES[0], f"127.0.0.1:{federation['ports'][0]}")
    config = to_dict(load(None, _coordinator(federation, "client.local_steps=2")))

    def call(method, *args):
        return wire.decode(ch.call(method, wire.encode({"job": "j1", "args": list(args)}), 60, 1 << 28), 1 << 28)

    with pytest.raises(grpc.RpcError) as e:
        call("describe")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # no hello yet
    ch.call("hello", wire.encode({"job": "j1", "config": config}), 60, 1 << 20)
    state = call("initial_adapter")
    assert call("train", state, 1)["num_examples"] > 0
    for method, args, code in [
        ("train", (state, 1), grpc.StatusCode.FAILED_PRECONDITION),  # answered already
        ("train", ({k: v.astype(np.float64)[..., :1] for k, v in state.items()}, 2), grpc.StatusCode.INVALID_ARGUMENT),
        ("train", ({"x": np.zeros(3, np.float32)}, 3), grpc.StatusCode.INVALID_ARGUMENT),
        ("secagg_reveal", ([0, 1], []), grpc.StatusCode.INTERNAL),  # no secure-aggregation round started
        ("secagg_share", ({"1": b"key"},), grpc.StatusCode.INTERNAL),
        ("commit", ("1",), grpc.StatusCode.INVALID_ARGUMENT),
        ("evaluate", ({"$ref": "0" * 64},), grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call(method, *args)
        assert e.value.code() == code, (method, e.value.details())
    assert call("describe")["name"] == NAMES[0]  # still up
    ch.close()


def test_a_thousand_malformed_messages_of_each_type_leave_the_service_up(federation):
    """Random bytes, truncations, flipped header bytes, wrong argument types and shapes, an
    oversized message — for every method: each gets an error (never an exception out of the
    handler), and the service still answers over the network afterwards."""
    import grpc

    from fl_llm.config import load, to_dict
    from fl_llm.remote.service import ARGS, METHODS, PlatformService, ServiceError
    from fl_llm.remote.tls import load_bundle
    from fl_llm.remote.transport import Channel

    service = federation["services"][0]
    config = to_dict(load(None, _coordinator(federation, "client.local_steps=1")))
    service.handle("hello", wire.encode({"job": "fuzz", "config": config}), ["coordinator"])
    state = wire.decode(
        service.handle("initial_adapter", wire.encode({"job": "fuzz", "args": []}), ["coordinator"]), 1 << 28
    )
    rng = np.random.default_rng(0)
    junk = [None, True, -1, 0, 2**70, 1e308, float("nan"), "x", "", [], {}, [1, "a"], {"a": 1}, b"\x00",
            np.zeros(2, np.int64), {"k": np.zeros((2, 2), np.float32)}, {"$ref": "nope"}]  # fmt: skip

    def malformed(method, k):
        valid = {"job": "fuzz", "args": [state, 1] if method == "train" else []}
        base = wire.encode(valid if method != "hello" else {"job": "fuzz", "config": config})
        kind = k % 5
        if kind == 0:
            return rng.bytes(int(rng.integers(0, 600)))
        if kind == 1:
            return base[: int(rng.integers(0, len(base)))]
        if kind == 2:  # flip a byte of the header (the JSON), never of the tensor data
            data = bytearray(base)
            hlen = int.from_bytes(data[4:8], "little")
            data[int(rng.integers(4, 8 + hlen))] ^= int(rng.integers(1, 256))
            return bytes(data)
        if kind == 3:  # the right shape of message, arguments of the wrong type
            n = len(ARGS.get(method, [])) or 1
            args = [junk[int(rng.integers(len(junk)))] for _ in range(int(rng.integers(1, n + 2)))]
            msg = {"job": "fuzz", "args": args} if method != "hello" else {"job": 7, "config": args[0]}
            return wire.encode(msg)
        shape = {k: np.zeros((v.shape[0] + 1, *v.shape[1:]), v.dtype) for k, v in state.items()}
        return wire.encode({"job": "fuzz", "args": [shape, 2, 0]})

    errors = answered = 0
    for method in METHODS:
        for k in range(1000):
            try:
                service.handle(method, malformed(method, k), ["coordinator"])
                answered += 1
            except ServiceError:
                errors += 1
            if service.job_id != "fuzz":  # a hello that got through (another job id) or tore the job down
                service.handle("hello", wire.encode({"job": "fuzz", "config": config}), ["coordinator"])
    assert errors >= 0.95 * (errors + answered) and errors + answered == 1000 * len(METHODS)
    small = PlatformService(service.own, service.name, "coordinator", 0)
    small.max_bytes = 1 << 16
    with pytest.raises(ServiceError, match="over the limit"):
        small.handle("describe", wire.encode({"job": "fuzz", "args": [np.zeros(1 << 15)]}), ["coordinator"])
    ch = Channel(load_bundle(federation["kits"] / "coordinator"), NAMES[0], f"127.0.0.1:{federation['ports'][0]}")
    for k in range(200):  # and over the network: the gRPC layer too
        with pytest.raises(grpc.RpcError):
            ch.call(METHODS[k % len(METHODS)], rng.bytes(int(rng.integers(0, 3000))), 10, 1 << 20)
    describe = wire.encode({"job": "fuzz", "args": []})
    assert wire.decode(ch.call("describe", describe, 10, 1 << 20), 1 << 20)["name"] == NAMES[0]
    ch.close()


def test_a_service_killed_mid_round_and_restarted_rejoins(federation, tmp_path):
    """Platform 2 is a real `fl-llm serve` process: SIGKILLed while it trains round 2 and started
    again, it counts as a failed, restarted platform in round 2 and trains again in round 3."""
    from fl_llm.config import load
    from fl_llm.server.loop import run

    port = _free_port()
    ports = [*federation["ports"][:2], port]
    kit = federation["kits"] / NAMES[2]
    serve = [sys.executable, "-m", "fl_llm", "serve", *SMALL, f"federation.bundle={kit}", f"serve.listen=127.0.0.1:{port}",
             f"client.state_dir={tmp_path / 'state'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    slow = "faults.delay=[{platform: 2, seconds: 60, rounds: [2]}]"
    procs = [subprocess.Popen([*serve, slow], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)]
    out = tmp_path / "run"

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and read_metrics(out)):
            time.sleep(0.2)
        time.sleep(1.0)  # round 2: platform 2 is in its 60 s sleep
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        procs.append(subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True))

    import threading

    t = threading.Thread(target=killer)
    t.start()
    try:
        cfg = load(None, [*SMALL, "server.rounds=3", "server.round_timeout_s=90", "client.local_steps=4",
                          f"federation.bundle={federation['kits'] / 'coordinator'}", _platforms(ports)])  # fmt: skip
        summary = run(cfg, out)
        t.join()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    rows = read_metrics(out)
    assert NAMES[2] in rows[1]["failed"] and "unreachable" in rows[1]["failed"][NAMES[2]]
    assert rows[1]["restarted"] == [NAMES[2]] and rows[1]["seconds"]["train"] < 50
    assert rows[2]["platforms"][NAMES[2]]["participated"] and summary["status"] == "completed"


def test_a_coordinator_config_that_cannot_work_stops_with_one_line(tmp_path, capsys):
    from fl_llm.cli import main

    two = "federation.platforms=[{name: a, address: 'h:1'}, {name: b, address: 'h:2'}]"
    both = [two, "data.num_platforms=2", "data.synthetic.train_examples=[100]"]
    for args, says in [
        ([two], "lists 2 platform services but data.num_platforms is 3"),
        (both, "federation.bundle' must name the coordinator's kit"),
        ([*both, "federation.bundle=/nonexistent"], "missing ca.pem"),
        (["federation.platforms=[{name: a, address: nohost}]", *both[1:], "data.num_platforms=1"], "host:port"),
        ([*both, "federation.bundle=x", "faults.kill=[{platform: 0, round: 1}]"], "its own"),
    ]:
        assert main(["run", *args, f"output_dir={tmp_path / 'r'}"]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
    assert main(["compare", *both, "federation.bundle=x", f"output_dir={tmp_path / 'c'}"]) == 2
    assert "pools every platform's data" in capsys.readouterr().err
    assert main(["serve", "federation.bundle=/nonexistent"]) == 2
    assert "missing ca.pem" in capsys.readouterr().err
    # a platform service that does not answer within federation.connect_timeout_s
    ports = [_free_port() for _ in NAMES]
    kits = _provision(tmp_path / "f", ports)
    down = [*SMALL, f"federation.bundle={kits / 'coordinator'}", _platforms(ports), "federation.connect_timeout_s=1"]
    assert main(["run", *down, f"output_dir={tmp_path / 'down'}"]) == 2
    assert f"platform 'fashion-mall' at 127.0.0.1:{ports[0]}" in capsys.readouterr().err
    assert not (tmp_path / "down").exists()


def test_the_deployment_guides_platform_config_is_valid():
    """docs/deployment.md's example platform config loads as written (every key exists)."""
    from fl_llm.config import from_dict

    text = (REPO / "docs" / "deployment.md").read_text()
    block = text.split("# fashion-mall.yaml\n", 1)[1].split("```", 1)[0]
    cfg = from_dict(yaml.safe_load(block))
    assert cfg.serve.policy.require == ["record_dp"] and cfg.serve.data_index == 0 and cfg.data.num_platforms == 1


def test_the_coordinator_names_no_model_files_on_a_platform(federation):
    """A job that trains another base model than the platform holds is refused at hello: the
    platform loads its own copy (its model.name_or_path), never a path or hub id the coordinator names."""
    from fl_llm.config import load, to_dict
    from fl_llm.remote.service import ServiceError

    service = federation["services"][0]
    job = to_dict(load(None, _coordinator(federation, "model.name_or_path=/somewhere/else", "model.kind=seq_cls")))
    with pytest.raises(ServiceError, match="set it to its own copy of the job's model"):
        service.handle("hello", wire.encode({"job": "other-model", "config": job}), ["coordinator"])
