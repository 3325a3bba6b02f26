"""Where platforms run: Ray actors (`RayBackend`) or in this process (`LocalBackend`).

This is the only module that imports Ray. Both backends run the same `Platform` class and offer
the same calls to the round loop:

- `put(state)`     -> a handle to the global adapter, stored once (Ray's object store);
- `call(ids, PlatformAPI.method, *args, timeout_s)` -> `Collected`: answers, errors, late and dead
  platforms (the methods of `fl_llm.client.api.PlatformAPI`, and no others);
- `restart(i)`     -> a fresh platform i in place of a dead one (it reloads its own data);
- `shutdown()`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from fl_llm.client.api import PlatformAPI, remote_name
from fl_llm.client.platform import Platform
from fl_llm.config import RunConfig, to_dict
from fl_llm.errors import UserError
from fl_llm.server.placement import host_placement, pinning, placement


@dataclass
class Collected:
    """What came back from one call on several platforms before the deadline."""

    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # every platform that did not answer, and why
    late: list[int] = field(default_factory=list)  # no answer by the deadline (no error either)
    dead: list[int] = field(default_factory=list)  # its process is gone: restart it before the next call


class _Backend:
    def call(self, ids, method, *args, timeout_s: float) -> Collected:
        """`method(*args)` on each platform in `ids`; `method` is one of `PlatformAPI`'s."""
        return self.call_each({i: args for i in ids}, method, timeout_s=timeout_s)


class LocalBackend(_Backend):
    """Every platform in this process, one after another: for debugging without Ray."""

    name = "local"

    def __init__(self, cfg: RunConfig, run_id: str = "run"):
        self.config = to_dict(cfg)
        self.platforms = [Platform(self.config, i) for i in range(cfg.data.num_platforms)]

    def put(self, obj):
        return obj

    def call_each(self, args_by_id: dict[int, tuple], method, *, timeout_s: float) -> Collected:
        """`method(*args_by_id[i])` on each platform i, one after another."""
        from fl_llm.client.train import RoundDeadline
        from fl_llm.faults import InjectedKill

        name = remote_name(method)
        out = Collected()
        deadline = time.monotonic() + timeout_s
        for i, args in args_by_id.items():
            try:
                result = getattr(self.platforms[i], name)(*args)
            except RoundDeadline:
                out.late.append(i)
                continue
            except InjectedKill as e:  # stands for the process exit a Ray actor would really make
                out.errors[i], out.dead = f"platform process died: {e}", [*out.dead, i]
                continue
            except Exception:
                out.errors[i] = traceback.format_exc(limit=-3).strip()
                continue
            if time.monotonic() > deadline:
                out.late.append(i)  # run in sequence, so a late answer is only known afterwards
            else:
                out.results[i] = result
        return out

    def restart(self, i: int) -> None:
        self.platforms[i] = Platform(self.config, i)

    def shutdown(self) -> None:
        self.platforms = []


def _init_ray(cfg: RunConfig) -> None:
    """Start or join Ray as `ray.address` says. Unset means a fresh private instance on this
    machine, reachable from it alone — never a cluster someone else started here (which
    `ray.init()` would join). Inside a submitted job Ray sets RAY_ADDRESS to the job's cluster."""
    import ray

    address = cfg.ray.address
    check_address(address)
    in_job = bool(os.environ.get("RAY_ADDRESS"))
    local = address is None and not in_job
    try:
        with loopback_only(local):
            ray.init(
                address="local" if local else address,
                num_cpus=cfg.ray.num_cpus if local else None,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="WARNING",
                **({"_node_ip_address": LOOPBACK} if local else {}),
                # a submitted job brings its own runtime env (working dir, env vars): merging
                # ours into it is refused by Ray, so only a local instance gets one
                **({"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}} if local else {}),
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a private local Ray instance" if local else f"ray.address {address!r}"
        raise UserError(f"{where}: Ray did not start or connect ({_first_line(e)})") from None


class RayBackend(_Backend):
    """One long-lived Ray actor per platform; the base model stays resident in each."""

    name = "ray"

    def __init__(self, cfg: RunConfig, run_id: str = "run"):
        import ray

        self._ray = ray
        self._started_here = False
        if not ray.is_initialized():
            _init_ray(cfg)
            self._started_here = True
        n = cfg.data.num_platforms
        k = cfg.ray.platforms_per_gpu
        self._config = to_dict(cfg)
        # Unique per backend: several runs (a test module, `fl-llm compare`) may share one Ray instance.
        self.run_id = f"{run_id}-{uuid.uuid4().hex[:8]}"
        if k > 1:  # hosts: k platforms on one resident base model each (fl_llm.client.host)
            from fl_llm.client.host import PlatformHost

            groups = [list(range(s, min(s + k, n))) for s in range(0, n, k)]
            cpus, gpus = host_placement(cfg, ray.cluster_resources(), len(groups))
            self._remote = ray.remote(PlatformHost)
            self.resources = {
                "hosts": len(groups),
                "platforms_per_host": k,
                "cpus_per_host": cpus,
                "gpus_per_host": gpus,
            }
        else:  # one actor per platform
            groups = [[i] for i in range(n)]
            cpus, gpus = placement(cfg, ray.cluster_resources())
            self._remote = ray.remote(Platform)
            self.resources = {"cpus_per_platform": cpus, "gpus_per_platform": gpus}
        self._options = {"num_cpus": cpus, "num_gpus": gpus, "max_concurrency": 1, "max_restarts": 0}
        self._threads = max(1, int(cpus))
        self.groups = groups
        self.host_of = {i: h for h, members in enumerate(groups) for i in members}
        self.hosted = k > 1
        self.stale: set[int] = set()  # hosts whose process died: restart once, whichever platform asks
        try:
            self._pins = pinning(cfg, ray.cluster_resources(), ray.nodes())
        except UserError:
            if self._started_here:
                ray.shutdown()
            raise
        self.generation = [0] * len(groups)
        self.actors = [self._start(h) for h in range(len(groups))]

    def actor_name(self, i: int) -> str:
        """Named, so `ray list actors` (and a test rehearsing a crash) can find platform i."""
        h = self.host_of[i]
        what = f"host-{h}" if self.hosted else f"platform-{i}"
        return f"fl_llm:{self.run_id}:{what}:{self.generation[h]}"

    def _start(self, h: int):
        members = self.groups[h]
        options = {**self._options, **self._pins.get(members[0], {}), "name": self.actor_name(members[0])}
        if self.hosted:
            return self._remote.options(**options).remote(self._config, members, self._threads, True)
        return self._remote.options(**options).remote(self._config, members[0], self._threads, True)

    def _method(self, i: int, method, args: tuple):
        name = remote_name(method)
        actor = self.actors[self.host_of[i]]
        return actor.call.remote(i, name, *args) if self.hosted else getattr(actor, name).remote(*args)

    def put(self, obj):
        return self._ray.put(obj)

    def call_each(self, args_by_id: dict[int, tuple], method, *, timeout_s: float) -> Collected:
        """`method(*args_by_id[i])` on each platform i, all at once, collected until the deadline."""
        from fl_llm.client.train import RoundDeadline

        ray = self._ray
        if not args_by_id:  # e.g. a Poisson sample that drew no platform
            return Collected()
        refs = {self._method(i, method, args): i for i, args in args_by_id.items()}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        out = Collected(late=sorted(refs[r] for r in pending))
        for ref in ready:
            i = refs[ref]
            try:
                out.results[i] = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the process is gone (exit, OOM, lost node, ray.kill)
                out.errors[i] = f"platform process died: {_first_line(e)}"
                out.dead.append(i)
            except ray.exceptions.OutOfMemoryError as e:  # Ray's memory monitor killed the worker
                out.errors[i] = f"platform process killed: the node ran out of memory ({_first_line(e)})"
                out.dead.append(i)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e, RoundDeadline) or isinstance(getattr(e, "cause", None), RoundDeadline):
                    out.late.append(i)  # it gave up at the deadline: late, not broken
                else:
                    out.errors[i] = str(e).strip()
            except ray.exceptions.RayError as e:
                out.errors[i] = str(e).strip()[:2000]
        if self.hosted and out.dead:  # a host's process took every platform on it along
            for h in {self.host_of[i] for i in out.dead}:
                self.stale.add(h)
                out.dead.extend(j for j in self.groups[h] if j not in out.dead)
        return out

    def restart(self, i: int) -> None:
        """Replace platform i's actor (dead, or stuck) with a new one; it reloads its own data.
        On a host, every platform of it gets the new process (once, whichever asks first)."""
        h = self.host_of[i]
        if self.hosted and h not in self.stale:
            return  # already replaced for a co-hosted platform
        self.stale.discard(h)
        self._ray.kill(self.actors[h], no_restart=True)
        self.generation[h] += 1
        self.actors[h] = self._start(h)

    def shutdown(self) -> None:
        """Kill every platform actor and wait until its process has exited: a Ray worker that
        outlives the run keeps its model (hundreds of MB) in memory for minutes."""
        ray = self._ray
        actors, self.actors = getattr(self, "actors", []), []
        pids = []
        if actors:
            refs = [a.process.remote() for a in actors]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
            for ref in ready:
                try:
                    pids.append(ray.get(ref))
                except ray.exceptions.RayError:
                    pass  # already dead
        for a in actors:
            ray.kill(a, no_restart=True)
        if self._started_here:
            ray.shutdown()
        reap(pids)


LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def loopback_only(local: bool):
    """Start a local instance whose every server (GCS, raylet, object manager, workers, agents)
    listens on the loopback interface alone. Ray binds its servers to all interfaces unless the
    node's IP is 127.0.0.1, and `ray.init` replaces a loopback `_node_ip_address` with the
    machine's reachable address (`services.resolve_ip_for_localhost`); for fl_llm's own private
    instance that replacement is skipped, so nothing it starts can be reached from another host.
    Ray's token authentication stays as Ray sets it (on unless RAY_AUTH_MODE=disabled).
    tests/test_hostile.py checks the listening sockets of a real run."""
    if not local:
        yield
        return
    from ray._private import services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def reap(processes: list[tuple[str, int]], timeout_s: float = 20.0) -> None:
    """Wait for the platform processes this run started on this host to exit; kill any still
    there after `timeout_s` (each is a `ray::` worker of ours, identified by host and pid)."""
    import psutil

    here = socket.gethostname()
    procs = []
    for host, pid in processes:
        if host != here:
            continue
        try:
            proc = psutil.Process(pid)
            if "ray::" in " ".join(proc.cmdline()) or proc.name().startswith("ray::"):
                procs.append(proc)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when `ray.address` names a host:port that does not answer."""
    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"ray.address {address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(
            f"ray.address {address!r}: nothing answers there ({e.strerror or e}); is the Ray head running "
            "(`ray start --head`) and the port reachable?"
        ) from None


def start_ray(cfg: RunConfig) -> None:
    """Start or join Ray now (`fl-llm serve` with serve.backend=ray: before its gRPC server runs
    threads, which Ray's forked processes must not inherit)."""
    import ray

    if not ray.is_initialized():
        _init_ray(cfg)


class RayPlatform:
    """One platform as an actor of this organisation's own Ray (`fl-llm serve` with
    serve.backend=ray): its methods called synchronously, as the service calls a `Platform`."""

    def __init__(self, cfg: RunConfig, index: int, data_index: int | None = None):
        import ray

        start_ray(cfg)
        cpus, gpus = placement(replace(cfg, data=replace(cfg.data, num_platforms=1)), ray.cluster_resources())
        self._ray = ray
        self._actor = (
            ray.remote(Platform)
            .options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
            .remote(to_dict(cfg), index, max(1, int(cpus)), True, None, data_index)
        )

    def __getattr__(self, name: str):
        from fl_llm.client.train import RoundDeadline
        from fl_llm.errors import PlatformGone

        remote_name(getattr(PlatformAPI, name, None))  # the remote API and nothing else
        method, ray = getattr(self._actor, name), self._ray

        def call(*args):
            try:
                return ray.get(method.remote(*args))
            except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as e:
                raise PlatformGone(_first_line(e)) from None
            except ray.exceptions.RayTaskError as e:
                if isinstance(e, RoundDeadline) or isinstance(getattr(e, "cause", None), RoundDeadline):
                    raise RoundDeadline(str(e)) from None
                raise

        return call

    def close(self) -> None:
        self._ray.kill(self._actor, no_restart=True)


def make_backend(cfg: RunConfig, run_id: str = "run"):
    if cfg.federation.platforms:  # other organisations' platform services (fl_llm.remote)
        from fl_llm.remote.coordinator import RemoteBackend

        return RemoteBackend(cfg, run_id)
    return RayBackend(cfg, run_id) if cfg.backend == "ray" else LocalBackend(cfg, run_id)
