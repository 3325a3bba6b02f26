"""Behaviour pinned across restructurings: the default job and four variants give the per-round
eval_loss and final adapter bytes recorded in benchmarks/pinned.json (on the machines and torch
builds that recorded them; elsewhere it skips). Minutes: run with `-m slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PINNED = REPO / "benchmarks" / "pinned.json"


@pytest.mark.slow
def test_the_pinned_jobs_give_the_recorded_results():
    if not PINNED.exists():
        pytest.skip("no benchmarks/pinned.json recorded on this machine")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pin.py"), "check", str(PINNED)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1800,
        # the threads the pins were recorded with: not the one thread each suite worker sets
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())  # recorded on other hardware: bit-exact floats do not carry
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    for record in json.loads(PINNED.read_text())["records"]:
        assert set(record["jobs"]) == {"default", "scaffold", "fedex", "fedsa", "secagg_int8"}, record["machine"]
