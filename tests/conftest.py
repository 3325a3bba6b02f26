"""Shared test helpers: small configs, and where the shared real data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite's two workers share the cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A federation small enough to train in seconds on one CPU core.
SMALL_STEPS = 4  # local steps a round: the plumbing runs; a test that needs learning asks for more
SMALL = [
    "data.synthetic.train_examples=[160,120,80]",
    "data.synthetic.eval_examples=80",
    f"client.local_steps={SMALL_STEPS}",
    "client.lr=0.003",
    "server.rounds=2",
    "tracking.progress=false",
]


@pytest.fixture
def small_cfg():
    from fl_llm.config import load

    def make(*extra: str):
        return load(None, [*SMALL, *extra])

    return make


def start_local_ray(num_cpus: int = 2):
    """A private Ray instance for one test module. `address="local"`: never the cluster another
    module (in the other test worker) started with `ray start`, which a bare `ray.init()` would join."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def platform_states(run_dir) -> dict:
    """{platform name: the state it kept between rounds}, read from each platform's own state dir
    (RUN_DIR/platforms/<name>/checkpoints, newest): what the driver never reads."""
    from fl_llm import checkpoint

    out = {}
    for d in sorted((Path(run_dir) / "platforms").iterdir()):
        latest = checkpoint.latest(d / "checkpoints")
        if latest is not None:
            out[d.name] = checkpoint.load(latest)[1]["persistent"]
    return out


def pytest_collection_modifyitems(config, items):
    """`slow` tests (minutes each) run only when asked for (`-m slow`), so the plain
    `python -m pytest` of the README and CI stays within its time."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
