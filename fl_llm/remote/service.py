"""`fl-llm serve PLATFORM_CONFIG`: one organisation's platform behind mutual TLS.

The service holds this organisation's `Platform` — its data, its model, its state dir — in its
own process (`serve.backend=local`) or as an actor of its own Ray (`serve.backend=ray`), and
answers the coordinator over gRPC, one streamed call per `PlatformAPI` method plus `hello`, which
starts a job: the coordinator sends its job config, the service builds the platform from it — with
*its own* data, device, state dir and fault settings, never the coordinator's — and checks the job
against its policy (`fl_llm.remote.policy`). Every message is `fl_llm.remote.wire`'s inert format,
checked against the method's fixed argument schema (`ARGS`) before anything runs.

Why gRPC: HTTP/2 streams for adapters of any size, deadlines carried by every call, mutual TLS
built in (BoringSSL), and a maintained Python package that Ray already depends on; with generic
handlers and raw bytes no generated code is needed.

What is refused with an error reply, the service staying up: a caller without a certificate of the
federation CA or with another party's name (TLS or `refused`), a message over
`federation.max_message_mb`, malformed or truncated, a wrong argument type, a tensor of a foreign
dtype or shape, a train request for a round (and attempt) it has answered already in this job, a
secure-aggregation step out of order, and any call before `hello`.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from pathlib import Path

import numpy as np

from fl_llm.client.api import REMOTE, PlatformAPI
from fl_llm.config import FederationConfig, RunConfig, from_dict, to_dict
from fl_llm.errors import PlatformGone
from fl_llm.model.build import is_builtin
from fl_llm.remote.policy import Ledger, refusals, reported
from fl_llm.remote.wire import WireError, decode, digest, encode

SERVICE = "fl_llm.Platform"
KEPT_STATES = 4  # global adapters (and control variates) a service keeps to be referred to by digest
# One platform call at a time in a process: torch's seed, default dtype and thread pool are
# process-wide, so services sharing a process (tests) must not build or train at once.
_TORCH = threading.Lock()


class ServiceError(Exception):
    """A request the service answers with an error: `kind` is protocol, refused, stale, late, gone or failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def _state(x) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in x.items())


def _is(kind):
    return lambda x: isinstance(x, kind) and not isinstance(x, bool)


_INT, _NUM = _is(int), _is((int, float))
CHECKS = {
    "state": _state,
    "state?": lambda x: x is None or _state(x),
    "int>0": lambda x: _INT(x) and x > 0,
    "int>=0": lambda x: _INT(x) and x >= 0,
    "num?": lambda x: x is None or (_NUM(x) and np.isfinite(x) and x >= 0),
    "dict?": lambda x: x is None or isinstance(x, dict),
    "dict": lambda x: isinstance(x, dict),
    "bool": lambda x: isinstance(x, bool),
    "str": lambda x: isinstance(x, str) and len(x) < 4096,
    "ints": lambda x: isinstance(x, list) and all(_INT(v) and v >= 0 for v in x),
}
# Each method's arguments, in order: (name, check). Trailing ones may be left out (their defaults).
# train's `anchor` (a personalisation round's pull toward the federated model) is not served: a
# federation of organisations is never personalised through the coordinator.
ARGS: dict[str, list[tuple[str, str]]] = {
    "describe": [],
    "initial_adapter": [],
    "train": [("global_state", "state"), ("round_", "int>0"), ("attempt", "int>=0"), ("budget_s", "num?"),
              ("control", "state?"), ("base", "dict?"), ("secagg", "dict?")],
    "evaluate": [("global_state", "state"), ("base", "dict?"), ("detail", "bool"), ("generate", "bool")],
    "commit": [("round_", "int>0")],
    "save_state": [("round_", "int>=0"), ("keep", "int>0")],
    "load_state": [("round_", "int>=0")],
    "save_personal": [("root", "str"), ("base_name", "str")],
    "secagg_advertise": [("round_", "int>0"), ("threshold", "int>0")],
    "secagg_share": [("keys", "dict")],
    "secagg_reveal": [("survivors", "ints"), ("dropped", "ints")],
}  # fmt: skip
assert set(ARGS) == REMOTE, "every PlatformAPI method needs its argument schema here"
REQUIRED = {  # how many leading arguments have no default in the protocol
    m: sum(1 for p in list(inspect.signature(getattr(PlatformAPI, m)).parameters.values())[1:] if p.default is p.empty)
    for m in ARGS
}
METHODS = ("hello", *sorted(ARGS))


class PlatformService:
    """The request handler: everything but the network, so that tests (and the fuzzer) call it directly."""

    def __init__(self, own: RunConfig, name: str, coordinator: str, index: int):
        self.own, self.name, self.coordinator, self.index = own, name, coordinator, index
        self.data_index = index if own.serve.data_index is None else own.serve.data_index
        self.max_bytes = int(own.federation.max_message_mb * 2**20)
        root = own.client.state_dir or str(Path("fl_state") / "{name}")
        self.state_dir = Path(root.replace("{name}", name)).resolve()
        self.ledger = Ledger(self.state_dir / "privacy_ledger.json")
        self.platform = None
        self.job: RunConfig | None = None
        self.job_id: str | None = None
        self.states: dict[str, dict] = {}  # digest -> adapter state, newest last
        self.answered: set[tuple[int, int]] = set()

    # --- one request -----------------------------------------------------------------------------

    def handle(self, method: str, payload: bytes, peer: list[str]) -> bytes:
        """The reply to `method` with `payload` from a caller whose certificate names `peer`."""
        if self.coordinator not in peer:
            raise ServiceError(
                "refused", f"only the federation's coordinator {self.coordinator!r} may call {self.name!r}"
            )
        if method not in METHODS:
            raise ServiceError("protocol", f"unknown method {method!r}")
        try:
            msg = decode(payload, self.max_bytes)
        except WireError as e:
            raise ServiceError("protocol", str(e)) from None
        if not isinstance(msg, dict) or not isinstance(msg.get("job"), str):
            raise ServiceError("protocol", "a request is {job, args} (or {job, config} for hello)")
        with _TORCH:
            if method == "hello":
                return encode(self._hello(msg))
            if self.platform is None or msg["job"] != self.job_id:
                raise ServiceError("stale", "no job with this id here: start it with hello")
            args = self._arguments(method, msg.get("args"))
            return encode(self._call(method, args))

    def _arguments(self, method: str, args) -> list:
        spec = ARGS[method]
        if not isinstance(args, list) or not REQUIRED[method] <= len(args) <= len(spec):
            raise ServiceError("protocol", f"{method} takes {REQUIRED[method]} to {len(spec)} arguments, as a list")
        args = [self._resolved(a) for a in args]
        for (name, check), value in zip(spec, args):
            if not CHECKS[check](value):
                raise ServiceError("protocol", f"{method}: argument {name} is not {check}")
            if check.startswith("state") and value is not None:
                self._check_layout(method, name, value)
        return args

    def _check_layout(self, method: str, name: str, state: dict) -> None:
        """An adapter state must hold this model's tensors: known keys, their shapes, float32."""
        for key, arr in state.items():
            if key not in self.layout:
                raise ServiceError("protocol", f"{method}: {name} holds {key[:200]!r}, not a tensor of this adapter")
            if arr.shape != self.layout[key] or arr.dtype != np.float32:
                raise ServiceError(
                    "protocol",
                    f"{method}: {name}[{key!r}] is {arr.dtype}{list(arr.shape)}, expected float32{list(self.layout[key])}",
                )

    def _resolved(self, arg):
        """A global adapter the coordinator refers to by digest, or one it sends (kept for later)."""
        if isinstance(arg, dict) and set(arg) == {"$ref"}:
            if not isinstance(arg["$ref"], str) or arg["$ref"] not in self.states:
                raise ServiceError("stale", "unknown state ref: send the state itself")
            return self.states[arg["$ref"]]
        if _state(arg) and arg:
            key = digest(arg)
            self.states.pop(key, None)
            self.states[key] = arg
            while len(self.states) > KEPT_STATES:
                self.states.pop(next(iter(self.states)))
        return arg

    def _call(self, method: str, args: list):
        from fl_llm.client.train import RoundDeadline

        if method == "train":
            self._may_train(*args[1:3])
        if method == "save_personal":  # under this platform's own state dir, whatever the coordinator says
            args = [str(self.state_dir / "personal"), *args[1:]]
        try:
            result = getattr(self.platform, method)(*args)
        except RoundDeadline:
            raise ServiceError("late", "past the round's deadline") from None
        except PlatformGone as e:  # its Ray actor died: the coordinator restarts it (hello again)
            self.platform = None
            raise ServiceError("gone", f"platform process died: {e}") from None
        except Exception as e:  # the platform's own failure: its type and message, not its traceback
            raise ServiceError("failed", f"{type(e).__name__}: {e}"[:2000]) from None
        if method == "train":
            self._book(*args[1:3])
        if method == "evaluate":
            result = reported(self.own.serve.policy, result)
        if method == "describe":
            result = {**result, "policy": to_dict(self.own)["serve"]["policy"], "service": self.name}
        return result

    def _may_train(self, round_: int, attempt: int = 0) -> None:
        policy = self.own.serve.policy
        if (round_, attempt) in self.answered:
            raise ServiceError("stale", f"round {round_} attempt {attempt} was answered already in this job")
        if policy.max_rounds is not None and round_ > policy.max_rounds:
            raise ServiceError(
                "refused", f"platform {self.name!r}: its policy allows at most {policy.max_rounds} rounds"
            )
        if (
            policy.max_epsilon is not None
            and self.ledger.epsilon(policy.max_delta, self._round_cost()) > policy.max_epsilon
        ):
            raise ServiceError(
                "refused", f"platform {self.name!r}: another round would pass its ε cap {policy.max_epsilon:g}"
            )
        self.answered.add((round_, attempt))

    def _round_cost(self):
        from fl_llm.privacy.accountant import Mechanism

        if self.job.privacy.dp.level != "record":
            return []
        return [(Mechanism(self.noise, self.sample_rate), self.job.client.local_steps)]

    def _book(self, round_: int, attempt: int = 0) -> None:
        for mechanism, steps in self._round_cost():
            self.ledger.book(self.job_id, round_, attempt, mechanism, steps)

    # --- a job -----------------------------------------------------------------------------------

    def _hello(self, msg: dict) -> dict:
        """Start the coordinator's job here: build the platform from its config and this
        organisation's own settings, and check the job against the policy."""
        from fl_llm.client.data_facts import record_level_dp

        try:
            job = from_dict(msg.get("config") if isinstance(msg.get("config"), dict) else {})
        except Exception as e:  # noqa: BLE001 - whatever the coordinator sent, it is not a job
            raise ServiceError("protocol", f"hello: the job config is not valid: {str(e)[:500]}") from None
        listed = [p.name for p in job.federation.platforms]
        if self.index >= len(listed) or listed[self.index] != self.name:
            raise ServiceError(
                "refused", f"the job's federation.platforms does not name {self.name!r} as platform {self.index}"
            )
        if self.platform is not None and hasattr(self.platform, "close"):
            self.platform.close()  # a Ray actor of the previous job
        self.platform = self.job = self.job_id = None
        effective = self._effective(job)
        try:
            platform = self._platform(effective)
            facts = platform.describe()
        except Exception as e:  # noqa: BLE001 - a model or data it cannot build: the coordinator hears why
            raise ServiceError("failed", f"{type(e).__name__}: {str(e)[:1000]}") from None
        if facts.get("user_error"):
            raise ServiceError("failed", facts["user_error"])
        self.sample_rate, self.noise = record_level_dp(job, int(facts["num_train"]))
        self.job = job
        planned = [(m, steps * job.server.rounds) for m, steps in self._round_cost()]  # the whole job
        bad = refusals(self.own.serve.policy, job, self.name, planned, self.ledger)
        if bad:
            self.job = None
            raise ServiceError("refused", "; ".join(bad))
        self.layout = {k: v.shape for k, v in platform.initial_adapter().items()}
        self.platform, self.job_id = platform, msg["job"]
        self.states, self.answered = {}, set()
        return {"name": self.name, "index": self.index}

    def _effective(self, job: RunConfig) -> RunConfig:
        """The job as this platform runs it: the coordinator's training settings, this
        organisation's data, model files, device, state dir, Ray and fault settings and its
        consent to sample generations under DP (eval.samples_under_dp) — the
        coordinator names no path on this platform's machine."""
        own = self.own
        if is_builtin(own.model) != is_builtin(job.model):
            raise ServiceError(
                "refused",
                f"platform {self.name!r}: the job trains {job.model.name_or_path!r} and this platform's "
                f"model.name_or_path is {own.model.name_or_path!r}: set it to its own copy of the job's model",
            )
        client = dataclasses.replace(job.client, device=own.client.device, state_dir=str(self.state_dir))
        model = dataclasses.replace(job.model, name_or_path=own.model.name_or_path, init_adapter=None)
        # whether its held-out prompts may leave as sample generations under DP is its own call
        evaluation = dataclasses.replace(job.eval, samples_under_dp=own.eval.samples_under_dp)
        return dataclasses.replace(
            job,
            model=model,
            eval=evaluation,
            data=own.data,
            client=client,
            ray=own.ray,
            faults=own.faults,
            serve=own.serve,
            backend="local",
            federation=FederationConfig(),
        )

    def _platform(self, cfg: RunConfig):
        if self.own.serve.backend == "ray":
            from fl_llm.server.backends import RayPlatform

            return RayPlatform(cfg, self.index, self.data_index)
        from fl_llm.client.platform import Platform

        threads = self.own.serve.threads
        return Platform(to_dict(cfg), self.index, threads, hard_exit=True, data_index=self.data_index)
