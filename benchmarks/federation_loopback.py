"""The same job two ways on this machine: three provisioned `fl-llm serve` processes driven by a
coordinator over mutual TLS, and the single-cluster run (Ray backend). Prints whether the
per-round eval loss and the final adapter bytes match, the bytes on the wire per round against
the adapter traffic the run reports, and the round time of each.

    python benchmarks/federation_loopback.py OUT_DIR [KEY=VALUE ...]   # default: the default job

The three services share this machine, so each gets cores / 3 torch threads (serve.threads), as
the Ray backend gives each platform actor its share of the CPUs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

NAMES = ["fashion-mall", "gadget-hub", "home-market"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(out: Path, overrides: list[str]) -> dict:
    from fl_llm.remote.tls import provision

    out.mkdir(parents=True, exist_ok=False)
    ports = [_port() for _ in NAMES]
    fed = {"name": "loopback", "coordinator": {"name": "coordinator"},
           "platforms": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in zip(NAMES, ports)]}  # fmt: skip
    (out / "federation.yaml").write_text(yaml.safe_dump(fed))
    provision(out / "federation.yaml", out / "kits")
    cli = [sys.executable, "-m", "fl_llm"]
    # the services share this machine: a thread each per core, as the Ray backend gives its actors
    threads = max(1, (os.cpu_count() or 1) // len(NAMES))
    services = []
    for name, port in zip(NAMES, ports):
        log = open(out / f"serve-{name}.log", "w")
        services.append(subprocess.Popen(
            [*cli, "serve", *overrides, f"federation.bundle={out / 'kits' / name}", f"serve.listen=127.0.0.1:{port}",
             f"client.state_dir={out / 'state' / name}", f"serve.threads={threads}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
    try:
        listed = ", ".join(f"{{name: {n}, address: '127.0.0.1:{p}'}}" for n, p in zip(NAMES, ports))
        remote = [*overrides, f"federation.bundle={out / 'kits' / 'coordinator'}", f"federation.platforms=[{listed}]"]
        t = time.monotonic()
        subprocess.run([*cli, "run", *remote, "tracking.progress=false", f"output_dir={out / 'remote'}"], check=True)
        remote_s = time.monotonic() - t
    finally:
        for p in services:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)
    t = time.monotonic()
    subprocess.run([*cli, "run", *overrides, "tracking.progress=false", f"output_dir={out / 'single'}"], check=True)
    single_s = time.monotonic() - t
    a, b = _metrics(out / "remote"), _metrics(out / "single")
    adapter = "adapter/adapter_model.safetensors"
    wire = [sum(r["wire_bytes"].values()) / (r["bytes_up"] + r["bytes_down"]) - 1 for r in a]
    result = {
        "rounds": len(a),
        "max_eval_loss_difference": max(abs(x["eval_loss"] - y["eval_loss"]) for x, y in zip(a, b)),
        "adapter_bytes_identical": (out / "remote" / adapter).read_bytes() == (out / "single" / adapter).read_bytes(),
        "wire_over_adapter_traffic": {"min": min(wire), "max": max(wire)},
        "wire_bytes_per_round": sum(sum(r["wire_bytes"].values()) for r in a) / len(a),
        "adapter_traffic_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in a) / len(a),
        "round_s": {
            "remote": sum(r["seconds"]["round"] for r in a) / len(a),
            "ray": sum(r["seconds"]["round"] for r in b) / len(b),
        },  # fmt: skip
        "command_s": {"remote": round(remote_s, 1), "ray": round(single_s, 1)},
    }
    (out / "federation_loopback.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
