"""The chaos run: the default job for 30 rounds while things go wrong — five platform kills, a
×10⁶ update, a NaN update, and the driver SIGKILLed twice (after rounds 10 and 20), each time
followed by `fl-llm run --resume`. Prints what the run recorded and checks that exactly 30
rounds are logged, that no round's mean AUC falls more than 0.05 below the round before, and
that every refusal is on its round line.

    python benchmarks/chaos.py runs/chaos          # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FAULTS = [
    "faults.kill=[{platform: 0, round: 4}, {platform: 1, round: 9}, {platform: 2, round: 14}, "
    "{platform: 0, round: 19}, {platform: 1, round: 25}]",
    "faults.corrupt=[{platform: 2, rounds: [7], kind: scale, factor: 1000000}, {platform: 0, rounds: [12], kind: nan}]",
]


def rounds_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip().endswith("}"))


def main(out: str) -> int:
    out = Path(out)
    env = {**os.environ}
    log = open(out.with_suffix(".log"), "w")
    cmds = [
        [
            sys.executable,
            "-m",
            "fl_llm",
            "run",
            "server.rounds=30",
            *FAULTS,
            f"output_dir={out}",
            "tracking.progress=false",
        ],
        [sys.executable, "-m", "fl_llm", "run", "--resume", str(out)],
        [sys.executable, "-m", "fl_llm", "run", "--resume", str(out)],
    ]
    kill_after = [10, 20, None]
    t0 = time.monotonic()
    for cmd, kill_at in zip(cmds, kill_after):
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if kill_at is not None and rounds_logged(out) >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole Ray instance
                proc.wait()
                print(f"driver SIGKILLed after round {rounds_logged(out)} ({time.monotonic() - t0:.0f} s)")
                break
            time.sleep(0.2)
        else:
            if proc.returncode != 0:
                print(f"{' '.join(cmd[3:5])} exited {proc.returncode}")
                return 1
    log.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    text = out.with_suffix(".log").read_text()
    print(
        f"{len(rows)} rounds logged, rounds {rows[0]['round']}..{rows[-1]['round']}; {time.monotonic() - t0:.0f} s in all"
    )
    drops = [(b["round"], a["auc"] - b["auc"]) for a, b in zip(rows, rows[1:]) if a["auc"] - b["auc"] > 0.05]
    for r in rows:
        events = {k: r[k] for k in ("failed", "rejected", "restarted") if r.get(k)}
        short = {k: (sorted(v) if isinstance(v, (list, dict)) else v) for k, v in events.items()}
        print(f"round {r['round']:>2}  auc {r['auc']:.3f}  loss {r['eval_loss']:.3f}  {short if short else ''}")
    refusals = [(r["round"], name) for r in rows for name in r.get("rejected", {})]
    on_lines = all(f"{name}: update rejected" in text for _, name in refusals)
    ok = [r["round"] for r in rows] == list(range(1, 31)) and not drops and len(refusals) == 2 and on_lines
    print(f"refusals {refusals} (on their round lines: {on_lines}); AUC drops > 0.05: {drops or 'none'}")
    print("CHAOS RUN PASSED" if ok else "CHAOS RUN FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/chaos"))
