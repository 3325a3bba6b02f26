"""`RemoteBackend`: the round loop's backend when the platforms are other organisations' services.

It offers the loop what the Ray and local backends offer (`put`, `call`/`call_each` with a
deadline returning `Collected`, `restart`, `shutdown`), so quorum, deadlines, retries,
checkpoints and resume work unchanged. Each call goes to the platforms at once (a thread each)
over `transport.Channel`:

- an unreachable service is *dead* (the loop's failure rules apply; `restart` makes the next call
  start the job there again with `hello`, then the loop has it load its checkpointed state);
- a call past the deadline, or a service that gave up at it, is *late*;
- any other error reply is an *error* with the service's message.

The global adapter goes to each platform once per version: `put` names it by digest, and a
platform known to hold that version gets ``{"$ref": digest}``; a service that no longer has it
answers "unknown state ref" and gets the tensors. `wire` counts the bytes each way
(`take_wire`, per round).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait

from fl_llm.client.api import remote_name
from fl_llm.config import RunConfig, to_dict
from fl_llm.errors import UserError
from fl_llm.remote.tls import load_bundle
from fl_llm.remote.transport import Channel
from fl_llm.remote.wire import WireError, decode, digest, encode
from fl_llm.server.backends import Collected, _Backend

HELD = 4  # versions remembered per platform (the service keeps as many)


class Shared:
    """An object `put` once: the global adapter (or control variate) sent once per platform."""

    def __init__(self, state: dict):
        self.state, self.digest = state, digest(state)


class RemoteBackend(_Backend):
    name = "remote"

    def __init__(self, cfg: RunConfig, run_id: str = "run"):
        fed_cfg = cfg.federation
        if not fed_cfg.bundle:
            raise UserError("federation.platforms is set: federation.bundle must name the coordinator's kit")
        self.creds = load_bundle(fed_cfg.bundle)
        fed = self.creds.federation
        if self.creds.name != fed.coordinator:
            raise UserError(
                f"federation.bundle is {self.creds.name!r}'s kit, not the coordinator's ({fed.coordinator!r})"
            )
        names = [p.name for p in fed_cfg.platforms]
        if names != fed.platform_names:
            raise UserError(f"federation.platforms names {names}; the federation file lists {fed.platform_names}")
        self.max_bytes = int(fed_cfg.max_message_mb * 2**20)
        self.config = to_dict(cfg)
        self.job = f"{run_id}-{uuid.uuid4().hex[:12]}"
        self.channels = [Channel(self.creds, p.name, p.address) for p in fed_cfg.platforms]
        self.pool = ThreadPoolExecutor(max_workers=len(self.channels) * 2)
        self.greeted: set[int] = set()
        self.held: dict[int, list[str]] = defaultdict(list)
        self.lock = threading.Lock()
        self.wire = {"sent": 0, "received": 0}
        self.resources = {"services": len(self.channels)}
        self._start_jobs(fed_cfg.connect_timeout_s)

    def _start_jobs(self, timeout_s: float) -> None:
        """`hello` to every service, waiting up to `timeout_s` for it to come up; any refusal is
        the user's to fix (a policy, the bundle, an address): one line naming the platform."""
        import grpc

        futures = {self.pool.submit(self._hello, i, timeout_s, True): i for i in range(len(self.channels))}
        for future, i in futures.items():
            try:
                future.result()
            except grpc.RpcError as e:
                ch = self.channels[i]
                what = e.details() if e.code() != grpc.StatusCode.UNAVAILABLE else "no answer (is `fl-llm serve` up?)"
                raise UserError(f"platform {ch.name!r} at {ch.address}: {what}") from None

    def _hello(self, i: int, timeout_s: float, wait_ready: bool = False) -> None:
        self._send(i, "hello", {"job": self.job, "config": self.config}, timeout_s, wait_ready)
        with self.lock:
            self.greeted.add(i)
            self.held[i] = []

    def _send(self, i: int, method: str, message, timeout_s: float, wait_ready: bool = False):
        payload = encode(message)
        with self.lock:
            self.wire["sent"] += len(payload)
        reply = self.channels[i].call(method, payload, max(timeout_s, 0.001), self.max_bytes, wait_ready)
        with self.lock:
            self.wire["received"] += len(reply)
        return decode(reply, self.max_bytes)

    def put(self, obj):
        return Shared(obj) if isinstance(obj, dict) else obj

    def call_each(self, args_by_id: dict[int, tuple], method, *, timeout_s: float) -> Collected:
        """`method(*args_by_id[i])` on each platform i, all at once, collected until the deadline."""
        import grpc

        name = remote_name(method)
        deadline = time.monotonic() + timeout_s
        futures = {self.pool.submit(self._call_one, i, name, args, deadline): i for i, args in args_by_id.items()}
        done, pending = wait(futures, timeout=timeout_s + 1.0)
        out = Collected(late=sorted(futures[f] for f in pending))
        for future in done:
            i = futures[future]
            try:
                out.results[i] = future.result()
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    out.late.append(i)
                elif code == grpc.StatusCode.UNAVAILABLE:
                    out.errors[i] = f"platform service unreachable: {e.details()}"
                    out.dead.append(i)
                else:
                    out.errors[i] = f"{code.name.lower()}: {e.details()}"
            except WireError as e:
                out.errors[i] = f"malformed reply: {e}"
        return out

    def _call_one(self, i: int, name: str, args: tuple, deadline: float):
        import grpc

        if i not in self.greeted:  # started again after a failure: wait for it (up to the deadline)
            self._hello(i, deadline - time.monotonic(), wait_ready=True)
        try:
            return self._send(
                i, name, {"job": self.job, "args": self._args(i, args, refs=True)}, deadline - time.monotonic()
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or "unknown state ref" not in (e.details() or ""):
                raise
            with self.lock:
                self.held[i] = []
            return self._send(
                i, name, {"job": self.job, "args": self._args(i, args, refs=False)}, deadline - time.monotonic()
            )

    def _args(self, i: int, args: tuple, refs: bool) -> list:
        """The arguments as sent to platform i: a `Shared` state it holds as a reference."""
        out = []
        for a in args:
            if isinstance(a, Shared):
                with self.lock:
                    known = a.digest in self.held[i]
                    if not known:
                        self.held[i] = [*self.held[i], a.digest][-HELD:]
                out.append({"$ref": a.digest} if known and refs else a.state)
            else:
                out.append(a)
        return out

    def take_wire(self) -> dict[str, int]:
        """Bytes sent to and received from the services since the last call."""
        with self.lock:
            got, self.wire = dict(self.wire), {"sent": 0, "received": 0}
        return got

    def restart(self, i: int) -> None:
        """A service that stopped answering: the next call starts the job there again (`hello`)."""
        with self.lock:
            self.greeted.discard(i)
            self.held[i] = []

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for ch in self.channels:
            ch.close()
