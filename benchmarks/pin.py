"""Behaviour pins: the default job (8 rounds), and the same job with SCAFFOLD, FedEx, FedSA and secure
aggregation with int8 uplinks — per-round `eval_loss` and the SHA-256 of the final adapter's
bytes. A restructuring that changes no behaviour leaves every figure identical — on the same CPU
model and torch build only: float results are bit-exact only there (another CPU moves eval_loss in
the 8th digit with the same code), so the file records them and `check` on other hardware says so
and exits 3 without comparing.

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
    """What bit-exact float results depend on: the CPU model and the torch build."""
    import platform

    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__}


def measure() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_job(name, overrides, Path(tmp)) for name, overrides in JOBS.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    mode, path = argv[0], Path(argv[1])
    if mode == "check":
        want = json.loads(path.read_text())
        recorded = want.pop("machine", None)
        if recorded != machine():
            print(f"recorded on {recorded}, this is {machine()}: not comparable (record the pins here first)")
            return 3
    got = measure()
    if mode == "record":
        path.write_text(json.dumps({"machine": machine(), **got}, indent=1) + "\n")
        print(f"wrote {path}")
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
