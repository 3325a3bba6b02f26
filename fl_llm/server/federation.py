"""What the driver carries from one round to the next — the global adapter, the strategy's state,
the downlink meter, the failure record, the base merges, the privacy ledger — and so what a
checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fl_llm.config import RunConfig
from fl_llm.errors import UserError
from fl_llm.server.base_merges import BaseMerges
from fl_llm.server.guard import Failures
from fl_llm.server.privacy import Privacy
from fl_llm.tensors import AdapterState


@dataclass
class Downlink:
    """Meters the global adapter sent to platforms: a platform downloads each version once."""

    size: int
    version: int = 0
    held: dict[int, int] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)

    def send(self, ids) -> None:
        for i in ids:
            if self.held.get(i) != self.version:
                self.held[i] = self.version
                self.sent[i] = self.sent.get(i, 0) + self.size

    def take_round(self) -> dict[int, int]:
        sent, self.sent = self.sent, {}
        return sent

    def forget(self, i: int) -> None:
        """A restarted platform holds nothing: it downloads the current version again."""
        self.held.pop(i, None)

    def add(self, i: int, nbytes: int) -> None:
        """Other bytes sent to platform i this round (base merges, SCAFFOLD's control variate)."""
        if nbytes:
            self.sent[i] = self.sent.get(i, 0) + nbytes


@dataclass
class Federation:
    """Everything the driver carries from one round to the next: what a checkpoint holds."""

    round: int
    global_state: AdapterState
    strategy_state: dict
    downlink: Downlink
    failures: Failures
    initial: dict
    merges: BaseMerges
    checkpointed: int = 0  # the last round whose state every platform saved in its own state dir
    recent_norms: list[float] = field(default_factory=list)  # accepted update norms of the last rounds
    elapsed_s: float = 0.0  # wall time spent in earlier processes of this run (before a resume)
    privacy: Privacy | None = None  # the DP ledger and mechanism state

    def to_checkpoint(self, elapsed_s: float, history: list[dict]) -> dict:
        return {
            "history": history,  # metrics.jsonl up to this round: a resume rewrites the file from it
            "round": self.round,
            "global_state": self.global_state,
            "strategy_state": self.strategy_state,
            "downlink": {
                "size": self.downlink.size,
                "version": self.downlink.version,
                "held": {str(k): v for k, v in self.downlink.held.items()},
            },
            "failures": self.failures.state(),
            "initial": self.initial,
            "merges": self.merges.state(),
            "recent_norms": list(self.recent_norms),
            "elapsed_s": elapsed_s,
            "privacy": self.privacy.state() if self.privacy else None,
        }

    @classmethod
    def from_checkpoint(cls, state: dict, cfg: RunConfig, merge_scale: float) -> Federation:
        if any(state.get("platform_state", {}).values()):
            raise UserError(
                "--resume: this checkpoint was written by an earlier fl_llm that kept each platform's state "
                "(control variates, personal B, optimizer moments, residuals) in the driver's checkpoint; "
                "platforms now keep it in their own state dir, so this run cannot continue exactly: start a new run"
            )
        d = state["downlink"]
        return cls(
            round=int(state["round"]),
            global_state={k: np.asarray(v) for k, v in state["global_state"].items()},
            strategy_state=state["strategy_state"],
            downlink=Downlink(int(d["size"]), int(d["version"]), {int(k): int(v) for k, v in d["held"].items()}),
            failures=Failures.from_state(cfg.server.max_failures, state["failures"]),
            initial=state["initial"],
            merges=BaseMerges.from_state(merge_scale, state["merges"]),
            checkpointed=int(state["round"]),
            recent_norms=[float(x) for x in state.get("recent_norms", [])],
            elapsed_s=float(state["elapsed_s"]),
            privacy=Privacy.from_state(cfg, state.get("privacy")),
        )
