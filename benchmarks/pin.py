"""Behaviour pins: the default job (8 rounds), and the same job with SCAFFOLD, FedEx, FedSA and secure
aggregation with int8 uplinks — per-round `eval_loss` and the SHA-256 of the final adapter's
bytes. A restructuring that changes no behaviour leaves every figure identical — on the same CPU
and torch build only: float results are bit-exact only there (another CPU moves eval_loss in the
8th digit with the same code; two CPUs that both call themselves "AMD EPYC" did too), so the file
keeps one record per machine — CPU name, family/model/stepping, the vector instructions torch uses,
core count, torch version — and `check` on a machine it has no record of says so and exits 3
without comparing. `record` adds this machine's record (or replaces it) and keeps the others.

    python benchmarks/pin.py record benchmarks/pinned.json    # before a change (about 3 min, 2 cores)
    python benchmarks/pin.py check benchmarks/pinned.json     # after it: exit 1 on any difference
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS = ["server.rounds=8"]  # the default job's first 8 rounds: every code path of a round, in a third of the time
JOBS = {
    "default": [*ROUNDS],
    "scaffold": [*ROUNDS, "strategy.name=scaffold", "client.optimizer=sgd", "client.lr=0.05"],
    "fedex": [*ROUNDS, "strategy.name=fedex"],
    "fedsa": [*ROUNDS, "strategy.name=fedsa"],
    "secagg_int8": [*ROUNDS, "privacy.secagg.enabled=true", "compression.name=int8"],
}


def run_job(name: str, overrides: list[str], root: Path) -> dict:
    out = root / name
    cmd = [sys.executable, "-m", "fl_llm", "run", *overrides, f"output_dir={out}", "tracking.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fl-llm run failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # the final model's bytes: the global adapter (FedSA: each platform's own), and the base
    # weights FedEx folds its residuals into
    digest = hashlib.sha256()
    files = [
        *out.glob("adapter/*.safetensors"),
        *out.glob("personal/*/*.safetensors"),
        *out.glob("base_model/*.safetensors"),
    ]
    for path in sorted(files):
        digest.update(str(path.relative_to(out)).encode())
        digest.update(path.read_bytes())
    return {"overrides": overrides, "eval_loss": [r["eval_loss"] for r in rows], "adapter_sha256": digest.hexdigest()}


def machine() -> dict:
    """What bit-exact float results depend on: the CPU (its name alone is not enough: the same
    name covers several generations), the vector instructions torch uses, the cores (they set the
    platforms' threads) and the torch build."""
    import os
    import platform

    import torch

    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {
        "cpu": info.get("model name", platform.processor()),
        "cpu_id": " ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info),
        "vector": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def _records(path: Path) -> list[dict]:
    """The file's records, [{"machine": ..., "jobs": {name: figures}}]; none before the first."""
    return json.loads(path.read_text())["records"] if path.exists() else []


def measure() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_job(name, overrides, Path(tmp)) for name, overrides in JOBS.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    mode, path = argv[0], Path(argv[1])
    here, records = machine(), _records(path)
    if mode == "check":
        mine = [r for r in records if r["machine"] == here]
        if not mine:
            seen = "; ".join(str(r["machine"]) for r in records) or "none"
            print(f"recorded on {seen}; this is {here}: not comparable (record the pins here first)")
            return 3
        want = mine[0]["jobs"]
    got = measure()
    if mode == "record":
        records = [r for r in records if r["machine"] != here] + [{"machine": here, "jobs": got}]
        path.write_text(json.dumps({"records": records}, indent=1) + "\n")
        print(f"wrote {path} ({len(records)} machine{'s' if len(records) > 1 else ''})")
        return 0
    bad = 0
    for name in want:
        same = {k: got[name][k] == want[name][k] for k in ("eval_loss", "adapter_sha256")}
        bad += not all(same.values())
        print(
            f"{name:<12} eval_loss {'same' if same['eval_loss'] else 'DIFFERENT'}, adapter bytes "
            f"{'same' if same['adapter_sha256'] else 'DIFFERENT'} ({got[name]['adapter_sha256'][:16]})"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
