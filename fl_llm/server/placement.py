"""Where platform actors go on a Ray cluster, and how much of it each gets: computed from the
config and what the cluster reports (no Ray import here; `backends` applies the result)."""

from __future__ import annotations

import math

from fl_llm.config import RunConfig
from fl_llm.errors import UserError


def pinning(cfg: RunConfig, resources: dict, nodes: list[dict]) -> dict[int, dict]:
    """Actor options that pin each platform to its node (`ray.placement`): custom resources or a
    label selector. A platform whose node is absent would wait forever: that is an error here."""
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    out = {}
    for pin in cfg.ray.placement:
        where = f"ray.placement: platform {pin.platform}"
        for name, amount in pin.resources.items():
            if float(resources.get(name, 0.0)) < amount:
                raise UserError(
                    f"{where} needs resource {name!r} x {amount:g}, but no node of the cluster offers it "
                    f"(offered: {resources.get(name, 0):g}); start the platform's node with "
                    f"`ray start --resources='{{\"{name}\": 1}}' ...`, or fix the name"
                )
        if pin.labels and not any(
            all((n.get("Labels") or {}).get(k) == v for k, v in pin.labels.items()) for n in alive
        ):
            raise UserError(
                f"{where} needs a node labelled {pin.labels}, and no live node of the cluster has those labels; "
                f"start it with `ray start --labels=...`, or fix the labels"
            )
        options: dict = {}
        if pin.resources:
            options["resources"] = dict(pin.resources)
        if pin.labels:
            options["label_selector"] = dict(pin.labels)
        out[pin.platform] = options
    return out


def host_placement(cfg: RunConfig, resources: dict, hosts: int) -> tuple[float, float]:
    """(CPUs, GPUs) per host actor: one GPU each where the cluster has enough, else a share."""
    total_cpu, total_gpu = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    cpus = min(float(cfg.ray.platforms_per_gpu), total_cpu / hosts) if total_cpu else 0.0
    gpus = min(1.0, total_gpu / hosts) if total_gpu else 0.0
    return math.floor(cpus * 1e4) / 1e4, math.floor(gpus * 1e4) / 1e4


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


def group_placement(cfg: RunConfig, resources: dict) -> tuple[float, float]:
    """(CPUs, GPUs) per worker of a platform of `ray.workers_per_platform` workers: as set, or the
    platform's share split over its workers, or an even share of the cluster (at most 1 each)."""
    n, w = cfg.data.num_platforms, cfg.ray.workers_per_platform
    total_cpu, total_gpu = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    ray = cfg.ray

    def per_worker(own, platform, total):
        if own is not None:
            return own
        if platform is not None:
            return platform / w
        return min(1.0, total / (n * w)) if total else 0.0

    cpus = per_worker(ray.cpus_per_worker, ray.cpus_per_platform, total_cpu)
    gpus = per_worker(ray.gpus_per_worker, ray.gpus_per_platform, total_gpu)
    if gpus > 0 and total_gpu == 0:
        raise UserError(f"ray.gpus_per_worker is {gpus} but the Ray cluster has no GPU")
    if cpus * n * w > total_cpu + 1e-9 or gpus * n * w > total_gpu + 1e-9:
        raise UserError(
            f"{n} platforms x {w} workers x ({cpus:g} CPU, {gpus:g} GPU) do not fit the cluster's "
            f"{total_cpu:g} CPUs and {total_gpu:g} GPUs; lower ray.cpus_per_worker / ray.gpus_per_worker "
            "or ray.workers_per_platform, or add nodes"
        )
    return math.floor(cpus * 1e4) / 1e4, math.floor(gpus * 1e4) / 1e4
