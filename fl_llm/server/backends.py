"""Where platforms run: Ray actors (`RayBackend`) or in this process (`LocalBackend`, in
`local_backend`). A platform of several workers is a placement group of actors (`_start_group`).

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
import signal
import threading
import uuid
from dataclasses import replace

from fl_llm.client.api import PlatformAPI, remote_name
from fl_llm.client.group import forget_rendezvous
from fl_llm.client.platform import Platform
from fl_llm.config import RunConfig, to_dict
from fl_llm.errors import UserError, first_line
from fl_llm.server.local_backend import Collected, LocalBackend, _Backend, check_address, reap
from fl_llm.server.placement import group_placement, host_placement, pinning, placement

__all__ = ["Collected", "LocalBackend", "RayBackend", "RayPlatform", "make_backend", "start_ray"]


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
        with loopback_only(local), _keeping_sigterm():
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
        raise UserError(f"{where}: Ray did not start or connect ({first_line(e)})") from None


@contextlib.contextmanager
def _keeping_sigterm():
    """`ray.init` replaces this process's SIGTERM handler twice: Python's with `sys.exit(15)`, and
    underneath it Ray's core installs one that logs a stack and aborts (signal 6) — a `kill` or
    `ray job stop` would end a run with no summary, not "interrupted", platforms not told. Put
    back the handler there was (the CLI's: stop as Ctrl-C does, resumable); only the main thread
    may set one."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if before is not None:  # None: set outside Python, nothing of ours to put back
            signal.signal(signal.SIGTERM, before)


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
        elif cfg.ray.workers_per_platform > 1:  # a group of workers per platform (fl_llm.client.group)
            groups = [[i] for i in range(n)]
            cpus, gpus = group_placement(cfg, ray.cluster_resources())
            self.resources = {
                "workers_per_platform": cfg.ray.workers_per_platform,
                "parallel": cfg.client.parallel,
                "cpus_per_worker": cpus,
                "gpus_per_worker": gpus,
            }
        else:  # one actor per platform
            groups = [[i] for i in range(n)]
            cpus, gpus = placement(cfg, ray.cluster_resources())
            self._remote = ray.remote(Platform)
            self.resources = {"cpus_per_platform": cpus, "gpus_per_platform": gpus}
        self._options = {"num_cpus": cpus, "num_gpus": gpus, "max_concurrency": 1, "max_restarts": 0}
        self._threads = max(1, int(cpus))
        self._group_wait_s = 60.0  # how long a platform's placement group may take to be placed
        self.groups = groups
        self.host_of = {i: h for h, members in enumerate(groups) for i in members}
        self.hosted = k > 1
        self.workers = cfg.ray.workers_per_platform if k == 1 else 1
        self.followers: list[list] = [[] for _ in groups]  # ranks 1.. of each platform's group
        self.placement_groups: list = [None] * len(groups)
        self.rendezvous: dict[int, dict] = {}
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
        if self.workers > 1:
            return self._start_group(h)
        options = {**self._options, **self._pins.get(members[0], {}), "name": self.actor_name(members[0])}
        if self.hosted:
            return self._remote.options(**options).remote(self._config, members, self._threads, True)
        return self._remote.options(**options).remote(self._config, members[0], self._threads, True)

    def _start_group(self, i: int):
        """Platform i as `ray.workers_per_platform` actors in one placement group on its own nodes:
        rank 0 (`GroupLeader`, which the driver calls) and its followers (`GroupWorker`), joined
        in a torch.distributed process group. A group that cannot be placed is a user error."""
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from fl_llm.client.group import GroupLeader, GroupWorker

        ray, w, pin = self._ray, self.workers, self._pins.get(i, {})
        bundle = {"CPU": self._options["num_cpus"], "GPU": self._options["num_gpus"]}
        # the platform's pinning resources, shared by its workers; its labels, on each of them
        bundle.update({k: v / w for k, v in pin.get("resources", {}).items()})
        bundle = {k: v for k, v in bundle.items() if v}
        labels = {"bundle_label_selector": [pin["label_selector"]] * w} if "label_selector" in pin else {}
        pg = placement_group([bundle] * w, strategy="PACK", name=self.actor_name(i), **labels)
        try:
            ray.get(pg.ready(), timeout=self._group_wait_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise UserError(
                f"platform {i}: its {w} workers, each {bundle}{' on nodes labelled ' + str(pin['label_selector']) if labels else ''}, "
                f"cannot be placed on the cluster within {self._group_wait_s:g} s (it offers {ray.available_resources()}); "
                "lower ray.workers_per_platform or the per-worker resources, or add the platform's nodes"
            ) from None
        self.placement_groups[i] = pg
        options = {k: v for k, v in self._options.items() if k != "resources"}

        def on(rank: int, name: str) -> dict:
            where = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank)
            return {**options, "scheduling_strategy": where, "name": name}

        leader = (
            ray.remote(GroupLeader).options(**on(0, self.actor_name(i))).remote(self._config, i, self._threads, True, w)
        )
        if len(ray.nodes()) == 1:  # one machine: a file rendezvous on its disk, no port opened
            rendezvous = ray.get(leader.rendezvous.remote(None))
        else:  # a cluster: rank 0's TCP store on its node's address
            host = ray.get(leader.__ray_call__.remote(lambda _: ray.util.get_node_ip_address()))
            rendezvous = ray.get(leader.rendezvous.remote(host))
        self.followers[i] = [
            ray.remote(GroupWorker)
            .options(**on(r, f"{self.actor_name(i)}:worker-{r}"))
            .remote(self._config, i, self._threads, rendezvous, r, w)
            for r in range(1, w)
        ]
        leader.join.remote(rendezvous, Followers(self.followers[i]))
        self.rendezvous[i] = rendezvous
        return leader

    def _method(self, i: int, method, args: tuple):
        name = remote_name(method)
        actor = self.actors[self.host_of[i]]
        if self.workers > 1:
            return actor.call.remote(name, *args)
        return actor.call.remote(i, name, *args) if self.hosted else getattr(actor, name).remote(*args)

    def put(self, obj):
        return self._ray.put(obj)

    def call_each(self, args_by_id: dict[int, tuple], method, *, timeout_s: float) -> Collected:
        """`method(*args_by_id[i])` on each platform i, all at once, collected until the deadline."""
        from fl_llm.client.group import WorkerLost
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
                out.errors[i] = f"platform process died: {first_line(e)}"
                out.dead.append(i)
            except ray.exceptions.OutOfMemoryError as e:  # Ray's memory monitor killed the worker
                out.errors[i] = f"platform process killed: the node ran out of memory ({first_line(e)})"
                out.dead.append(i)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e, RoundDeadline) or isinstance(getattr(e, "cause", None), RoundDeadline):
                    out.late.append(i)  # it gave up at the deadline: late, not broken
                elif isinstance(getattr(e, "cause", None), WorkerLost):  # its process group broke
                    out.errors[i] = f"platform worker lost: {e.cause}"
                    out.dead.append(i)
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
        self._kill(h)
        self.generation[h] += 1
        self.actors[h] = self._start(h)

    def _kill(self, h: int) -> None:
        """End host or platform h's processes: its actor, and a group's followers and placement."""
        from ray.util.placement_group import remove_placement_group

        for actor in [self.actors[h], *self.followers[h]]:
            self._ray.kill(actor, no_restart=True)
        self.followers[h] = []
        forget_rendezvous(self.rendezvous.pop(h, None))
        if self.placement_groups[h] is not None:
            remove_placement_group(self.placement_groups[h])
            self.placement_groups[h] = None

    def shutdown(self) -> None:
        """Kill every platform actor and wait until its process has exited: a Ray worker that
        outlives the run keeps its model (hundreds of MB) in memory for minutes."""
        ray = self._ray
        actors, self.actors = getattr(self, "actors", []), []
        pids = []
        everyone = [*actors, *(f for group in getattr(self, "followers", []) for f in group)]
        if actors:
            refs = [a.process.remote() for a in everyone]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
            for ref in ready:
                try:
                    pids.append(ray.get(ref))
                except ray.exceptions.RayError:
                    pass  # already dead
        for a in everyone:
            ray.kill(a, no_restart=True)
        if any(pg is not None for pg in getattr(self, "placement_groups", [])):
            from ray.util.placement_group import remove_placement_group

            for pg in self.placement_groups:
                if pg is not None:
                    remove_placement_group(pg)
        for rendezvous in getattr(self, "rendezvous", {}).values():
            forget_rendezvous(rendezvous)
        if self._started_here:
            ray.shutdown()
        reap(pids)


class Followers:
    """What rank 0 of a platform holds of its other workers: their actors, called in lockstep."""

    def __init__(self, actors: list):
        self.actors = actors

    def start(self, name: str, args: tuple) -> list:
        return [a.run.remote(name, args) for a in self.actors]

    def finish(self, calls: list) -> list:
        """Their answers, by rank from 1; `WorkerLost` when one died or failed."""
        import ray

        from fl_llm.client.group import WorkerLost
        from fl_llm.client.train import RoundDeadline

        out = []
        for rank, ref in enumerate(calls, start=1):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                if not isinstance(getattr(e, "cause", None), RoundDeadline):
                    raise WorkerLost(f"worker {rank} failed: {first_line(e)}") from None
                out.append(None)  # stopped at the deadline, with the others
            except ray.exceptions.RayError as e:  # its process is gone
                raise WorkerLost(f"worker {rank} died: {first_line(e)}") from None
        return out


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
                raise PlatformGone(first_line(e)) from None
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
