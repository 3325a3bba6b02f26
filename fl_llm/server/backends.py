"""Where platforms run: Ray actors (`RayBackend`) or in this process (`LocalBackend`).

This is the only module that imports Ray. Both backends run the same `Platform` class and offer
the same three calls to the round loop:

- `put(state)`     -> a handle to the global adapter, stored once (Ray's object store);
- `call(ids, method, *args, timeout_s)` -> `Collected`: answers, errors and late platforms;
- `shutdown()`.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from fl_llm.client.platform import Platform
from fl_llm.config import RunConfig, to_dict
from fl_llm.errors import UserError


@dataclass
class Collected:
    """What came back from one call on several platforms before the deadline."""

    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    late: list[int] = field(default_factory=list)


class _Backend:
    def call(self, ids, method: str, *args, timeout_s: float) -> Collected:
        """`method(*args)` on each platform in `ids`."""
        return self.call_each({i: args for i in ids}, method, timeout_s=timeout_s)


class LocalBackend(_Backend):
    """Every platform in this process, one after another: for debugging without Ray."""

    name = "local"

    def __init__(self, cfg: RunConfig):
        self.platforms = [Platform(to_dict(cfg), i) for i in range(cfg.data.num_platforms)]

    def put(self, obj):
        return obj

    def call_each(self, args_by_id: dict[int, tuple], method: str, *, timeout_s: float) -> Collected:
        """`method(*args_by_id[i])` on each platform i."""
        out = Collected()
        deadline = time.monotonic() + timeout_s
        for i, args in args_by_id.items():
            try:
                result = getattr(self.platforms[i], method)(*args)
            except Exception:
                out.errors[i] = traceback.format_exc(limit=-3).strip()
                continue
            if time.monotonic() > deadline:
                out.late.append(i)  # run in sequence, so a late answer is only known afterwards
            else:
                out.results[i] = result
        return out

    def shutdown(self) -> None:
        self.platforms = []


class RayBackend(_Backend):
    """One long-lived Ray actor per platform; the base model stays resident in each."""

    name = "ray"

    def __init__(self, cfg: RunConfig):
        import ray

        self._ray = ray
        self._started_here = False
        address = cfg.ray.address
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address,
                    num_cpus=cfg.ray.num_cpus if address is None else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="WARNING",
                    runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                )
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"ray.address {address!r}: cannot connect to a Ray cluster there ({e})") from None
            self._started_here = True
        n = cfg.data.num_platforms
        cpus, gpus = placement(cfg, ray.cluster_resources())
        remote = ray.remote(Platform).options(num_cpus=cpus, num_gpus=gpus, max_concurrency=1)
        threads = max(1, int(cpus))
        self.actors = [remote.remote(to_dict(cfg), i, threads) for i in range(n)]
        self.resources = {"cpus_per_platform": cpus, "gpus_per_platform": gpus}

    def put(self, obj):
        return self._ray.put(obj)

    def call_each(self, args_by_id: dict[int, tuple], method: str, *, timeout_s: float) -> Collected:
        """`method(*args_by_id[i])` on each platform i, all at once, collected until the deadline."""
        ray = self._ray
        refs = {getattr(self.actors[i], method).remote(*args): i for i, args in args_by_id.items()}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        out = Collected(late=sorted(refs[r] for r in pending))
        for ref in ready:
            try:
                out.results[refs[ref]] = ray.get(ref)
            except ray.exceptions.RayError as e:
                out.errors[refs[ref]] = str(e).strip()
        return out

    def shutdown(self) -> None:
        for a in getattr(self, "actors", []):
            self._ray.kill(a)
        self.actors = []
        if self._started_here:
            self._ray.shutdown()


def placement(cfg: RunConfig, resources: dict) -> tuple[float, float]:
    """(CPUs, GPUs) per platform actor, from the config and what the cluster offers.

    An actor that asks for a GPU the cluster lacks would wait forever, so that is an error here.
    """
    n = cfg.data.num_platforms
    total_cpu, total_gpu = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    cpus = cfg.ray.cpus_per_platform
    if cpus is None:
        cpus = min(1.0, total_cpu / n) if total_cpu else 0.0
    gpus = cfg.ray.gpus_per_platform
    if gpus is None:
        gpus = min(1.0, total_gpu / n) if total_gpu else 0.0
    if gpus > 0 and total_gpu == 0:
        raise UserError(f"ray.gpus_per_platform is {gpus} but the Ray cluster has no GPU")
    if cpus * n > total_cpu + 1e-9 or gpus * n > total_gpu + 1e-9:
        raise UserError(
            f"{n} platforms x ({cpus} CPU, {gpus} GPU) do not fit the cluster's "
            f"{total_cpu:g} CPUs and {total_gpu:g} GPUs; lower ray.cpus_per_platform / ray.gpus_per_platform"
        )
    # Ray counts resources in 1e-4 units: round down, or n shares of 2/3 would not fit in 2.
    return math.floor(cpus * 1e4) / 1e4, math.floor(gpus * 1e4) / 1e4


def make_backend(cfg: RunConfig):
    return RayBackend(cfg) if cfg.backend == "ray" else LocalBackend(cfg)
