"""The platform's remote API: everything the driver may ask of a platform, and nothing else.

Both backends (one Ray actor per platform, or every platform in this process) and the host actor
that holds several platforms on one base model serve exactly these methods, with these
signatures; `Platform` implements them (a test holds the signatures equal). The driver names a
method by this protocol — `backend.call(ids, PlatformAPI.describe, timeout_s=...)` — never by a
string, and anything else (per-record losses, the model, a name that is not here) is refused
before it reaches a platform.
"""

from __future__ import annotations

from typing import Protocol

from fl_llm.tensors import AdapterState


class PlatformAPI(Protocol):
    def describe(self) -> dict:
        """Name, data sizes and label balance (aggregates only), warnings, a user error if any."""

    def initial_adapter(self) -> AdapterState:
        """The adapter before any training (seeded; or model.init_adapter)."""

    def train(
        self,
        global_state: AdapterState,
        round_: int,
        attempt: int = 0,
        budget_s: float | None = None,
        control: AdapterState | None = None,
        base: dict | None = None,
        secagg: dict | None = None,
        anchor: dict | None = None,
    ) -> dict:
        """Local training from the global adapter: the update (plain, compressed or masked);
        `anchor` {"state", "mu"}: a personalisation round's proximal term toward a fixed adapter."""

    def evaluate(
        self, global_state: AdapterState, base: dict | None = None, detail: bool = False, generate: bool = False
    ) -> dict:
        """The adapter's metrics on this platform's held-out split (`generate`: also by generation)."""

    def commit(self, round_: int) -> bool:
        """The driver accepted this round's update: keep the state its training staged."""

    def save_state(self, round_: int, keep: int = 2) -> bool:
        """Write what the platform keeps between rounds to its own state dir."""

    def load_state(self, round_: int) -> int:
        """Take up the state saved after `round_`."""

    def save_personal(self, root: str, base_name: str) -> str:
        """FedSA: write this platform's own adapter (shared A, its own B)."""

    def secagg_advertise(self, round_: int, threshold: int) -> dict:
        """Secure aggregation step 0: this round's public keys."""

    def secagg_share(self, keys: dict) -> dict:
        """Step 1: encrypted shares of its secrets, one per other party."""

    def secagg_reveal(self, survivors: list[int], dropped: list[int]) -> dict:
        """Step 3: the shares that unmask the survivors' sum."""


REMOTE = frozenset(name for name in vars(PlatformAPI) if not name.startswith("_"))


def remote_name(method) -> str:
    """The name of a `PlatformAPI` method, which the backends send; anything else is refused."""
    name = getattr(method, "__name__", None)
    if name not in REMOTE or vars(PlatformAPI)[name] is not method:
        raise ValueError(f"{method!r} is not part of the platform's remote API (fl_llm.client.api.PlatformAPI)")
    return name
