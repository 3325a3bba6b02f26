"""A platform of several workers (`ray.workers_per_platform`): rank 0 is the platform the driver
talks to, the others follow it step for step. No Ray here: the backend places the processes,
hands rank 0 its followers (`followers.start(name, args)` / `followers.finish(calls)`) and gives
every worker the rendezvous of its process group (`fl_llm.client.parallel`).

Every call that touches the model runs on all of a platform's workers at once, because their
collectives must meet: training, committing and loading state, and — when the model is sharded —
evaluation and the adapter's reads. The rest (secure aggregation, saving state) is rank 0's
alone. A collective whose peer is gone fails at once; a worker whose call fails any other way
exits, so its peers fail too rather than wait, and rank 0 answers `WorkerLost`: the backend
restarts the whole platform, which counts as one platform failure.
"""

from __future__ import annotations

import os
import traceback

from fl_llm.client.api import REMOTE
from fl_llm.client.platform import Platform
from fl_llm.client.train import RoundDeadline
from fl_llm.errors import first_line


class WorkerLost(RuntimeError):
    """One of a platform's workers died or failed: its process group is broken; restart it whole."""


# calls every worker runs together; "sharded": only when the model is sharded (client.parallel=fsdp)
LOCKSTEP = {"describe", "initial_adapter", "train", "commit", "load_state"}
LOCKSTEP_SHARDED = {"evaluate", "save_personal"}


def lockstep(name: str, sharded: bool) -> bool:
    return name in LOCKSTEP or (sharded and name in LOCKSTEP_SHARDED)


class GroupWorker:
    """Rank r > 0 of a platform: joins the group as it starts, then runs what rank 0 runs."""

    def __init__(self, config: dict, platform_id: int, num_threads: int, rendezvous: dict, rank: int, world: int):
        self.platform = Platform(config, platform_id, num_threads, True, group=(rendezvous, rank, world))

    def run(self, name: str, args: tuple):
        try:
            return getattr(self.platform, name)(*args)
        except RoundDeadline:
            raise  # every worker agreed to stop (the round's deadline): nothing is broken
        except BaseException:
            traceback.print_exc()
            os._exit(1)  # its peers' next collective fails at once, instead of waiting for it

    def process(self) -> tuple[str, int]:
        return self.platform.process()


class GroupLeader:
    """Rank 0 of a platform: serves the platform's remote API (`PlatformAPI`) and leads its
    followers through each call that needs them."""

    def __init__(self, config: dict, platform_id: int, num_threads: int, hard_exit: bool, world: int):
        self.args, self.world = (config, platform_id, num_threads, hard_exit), world
        self.platform: Platform | None = None
        self.followers = None
        self.store = None  # a TCP rendezvous's store, which lives as long as the group

    def rendezvous(self, host: str | None) -> dict:
        """Where the platform's workers meet: a file in a new private directory of this node
        (`host` None: every worker is on this machine, and no port is opened), or a TCP store
        on `host`, this node's address on the cluster."""
        if host is None:
            import tempfile

            return {"file": os.path.join(tempfile.mkdtemp(prefix="fl_llm-group-"), "store")}
        from fl_llm.client.parallel import tcp_store

        self.store, port = tcp_store(host, self.world)
        return {"host": host, "port": port}

    def join(self, rendezvous: dict, followers) -> None:
        """Join the process group with the followers (started with the same rendezvous) and load
        the platform: its data, its model (sharded under FSDP)."""
        config, platform_id, num_threads, hard_exit = self.args
        self.followers = followers
        self.platform = Platform(config, platform_id, num_threads, hard_exit, group=(rendezvous, 0, self.world))

    def process(self) -> tuple[str, int]:
        from fl_llm.client.platform import this_process

        return this_process()

    def call(self, name: str, *args):
        """`name(*args)` on this platform: on rank 0 alone, or on every worker together."""
        if name not in REMOTE:
            raise ValueError(f"{name!r} is not part of the platform's remote API (fl_llm.client.api.PlatformAPI)")
        platform = self.platform
        if not lockstep(name, platform.group is not None and platform.group.sharded):
            return getattr(platform, name)(*args)
        calls = self.followers.start(name, args)
        try:
            result = getattr(platform, name)(*args)
        except RoundDeadline:
            self.followers.finish(calls)
            raise
        except Exception as e:
            raise WorkerLost(f"platform {platform.id}: {name} failed on worker 0 ({first_line(e)})") from e
        answers = self.followers.finish(calls)
        if name == "describe":
            result = _with_workers(result, answers)
        return result


def _with_workers(facts: dict, answers: list[dict]) -> dict:
    """Rank 0's description with every worker's device, and the first user error any found."""
    workers = [{"rank": 0, "device": facts.get("device"), "worker": facts.get("worker")}]
    for rank, other in enumerate(answers, start=1):
        workers.append({"rank": rank, "device": other.get("device"), "worker": other.get("worker")})
        if other.get("user_error") and not facts.get("user_error"):
            facts = {**facts, "user_error": f"worker {rank}: {other['user_error']}"}
    return {**facts, "workers": workers}


def forget_rendezvous(rendezvous: dict | None) -> None:
    """Remove a group's file rendezvous (the private directory `GroupLeader.rendezvous` made) when
    it is on this machine: the backend calls it as the group ends."""
    import shutil

    path = os.path.dirname((rendezvous or {}).get("file", ""))
    if os.path.basename(path).startswith("fl_llm-group-") and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
