"""The driver's record of what FedEx and FLoRA fold into the frozen base weights.

Each round such a strategy produces a merge — per LoRA layer, factors (B, A) with
W₀ ← W₀ + s·B·A — that every platform must apply exactly once, in order, before it trains or
evaluates again. The driver keeps the list and how many of them each platform process has
confirmed; a call carries only the merges that platform lacks (a restarted process gets them
all). The dense sum s·Σ B·A per layer is kept too, to export the merged base model: what is
saved is what was evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Merge = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class BaseMerges:
    scale: float  # s = α / r of the global adapter
    merges: list[Merge] = field(default_factory=list)
    applied: dict[int, int] = field(default_factory=dict)  # platform -> merges it has confirmed
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> s·Σ B·A

    def add(self, merge: Merge) -> None:
        self.merges.append({k: (np.asarray(b), np.asarray(a)) for k, (b, a) in merge.items()})
        for layer, (b, a) in merge.items():
            step = (self.scale * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
            self.dense[layer] = self.dense[layer] + step if layer in self.dense else step

    def payload(self, i: int) -> dict | None:
        """What platform i must apply before its next call (None: nothing to merge at all)."""
        if not self.merges:
            return None
        start = self.applied.get(i, 0)
        return {"start": start, "merges": self.merges[start:]}

    def payload_bytes(self, i: int) -> int:
        start = self.applied.get(i, 0)
        return int(sum(b.nbytes + a.nbytes for m in self.merges[start:] for b, a in m.values()))

    def confirm(self, ids) -> None:
        """These platforms answered a call that carried their payload: they have every merge."""
        for i in ids:
            self.applied[i] = len(self.merges)

    def forget(self, i: int) -> None:
        """A restarted platform process has a pristine base again."""
        self.applied.pop(i, None)

    def state(self) -> dict:
        return {
            "merges": [{k: [b, a] for k, (b, a) in m.items()} for m in self.merges],
            "applied": {str(k): v for k, v in self.applied.items()},
            "dense": self.dense,
        }

    @classmethod
    def from_state(cls, scale: float, state: dict) -> BaseMerges:
        return cls(
            scale,
            [{k: (np.asarray(b), np.asarray(a)) for k, (b, a) in m.items()} for m in state["merges"]],
            {int(k): int(v) for k, v in state["applied"].items()},
            {k: np.asarray(v) for k, v in state["dense"].items()},
        )

    def base_weight_deltas(self) -> dict[str, np.ndarray]:
        """{base parameter name: dense change}, in the base model's own naming
        (`model.layers.0.self_attn.q_proj.weight`)."""
        return {layer.removeprefix("base_model.model.") + ".weight": d for layer, d in self.dense.items()}
