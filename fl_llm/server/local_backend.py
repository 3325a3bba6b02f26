"""What the round loop gets back from the platforms (`Collected`), the in-process backend
(`LocalBackend`: every platform in the driver's process, for debugging without Ray) and the
process helpers the Ray backend shares. No Ray here (`fl_llm.server.backends` is Ray's module)."""

from __future__ import annotations

import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from fl_llm.client.api import remote_name
from fl_llm.client.platform import Platform
from fl_llm.config import RunConfig, to_dict
from fl_llm.errors import UserError


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
