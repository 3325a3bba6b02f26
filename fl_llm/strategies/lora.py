"""LoRA arithmetic shared by the LoRA-aware strategies: factor pairs, products, the aggregation
error, and ranks that differ per platform.

An adapter state maps PEFT keys to arrays; a LoRA layer is the pair
`<layer>.lora_A.weight` (r × k) and `<layer>.lora_B.weight` (d × r), its update to the frozen
weight W₀ (d × k) is s·B·A with s = α/r. Keys that are not LoRA factors (a classifier's head)
are ordinary parameters and are averaged as they are.

Products are never formed as d × k matrices to measure them: ‖Σ cⱼ BⱼAⱼ‖²_F equals
tr((BᵀB)(AAᵀ)) for the stacked factors B = [c₁B₁ … c_mB_m], A = [A₁; …; A_m], which costs
O((d + k)·(m·r)²) instead of O(d·k·m·r).
"""

from __future__ import annotations

import numpy as np

from fl_llm.errors import UserError
from fl_llm.strategies.base import Strategy
from fl_llm.tensors import AdapterState

A_TAG, B_TAG = ".lora_A.", ".lora_B."


def layers(state: AdapterState) -> list[str]:
    """The LoRA layers of a state, by their A key's prefix (`...q_proj`)."""
    return sorted(k.split(A_TAG)[0] for k in state if A_TAG in k and k.replace(A_TAG, B_TAG) in state)


def a_key(state: AdapterState, layer: str) -> str:
    return next(k for k in state if k.startswith(layer + A_TAG))


def b_key(state: AdapterState, layer: str) -> str:
    return a_key(state, layer).replace(A_TAG, B_TAG)


def is_a(key: str) -> bool:
    return A_TAG in key


def is_b(key: str) -> bool:
    return B_TAG in key


def product_gram(bs: list[np.ndarray], as_: list[np.ndarray]) -> np.ndarray:
    """K[j, k] = ⟨Bⱼ·Aⱼ, Bₖ·Aₖ⟩_F for all pairs, through the Gram matrices of the stacked factors
    (never a d × k product): ⟨BⱼAⱼ, BₖAₖ⟩ = Σ (BⱼᵀBₖ) ⊙ (AⱼAₖᵀ). Then ‖Σⱼ cⱼBⱼAⱼ‖² = cᵀKc."""
    b = np.concatenate([bj.astype(np.float64) for bj in bs], axis=1)
    a = np.concatenate([aj.astype(np.float64) for aj in as_], axis=0)
    starts = np.cumsum([0] + [bj.shape[1] for bj in bs[:-1]])
    blocks = (b.T @ b) * (a @ a.T)
    return np.add.reduceat(np.add.reduceat(blocks, starts, axis=0), starts, axis=1)


def frob2_of_sum(bs: list[np.ndarray], as_: list[np.ndarray], coefs: list[float]) -> float:
    """‖Σⱼ cⱼ·Bⱼ·Aⱼ‖²_F."""
    c = np.asarray(coefs, dtype=np.float64)
    return float(max(c @ product_gram(bs, as_) @ c, 0.0))


def aggregation_error(
    global_state: AdapterState,
    locals_: list[AdapterState],
    weights,
    new_global: AdapterState,
    merged: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> float | None:
    """‖Σ pᵢBᵢAᵢ − (B·A + merged)‖_F / ‖Σ pᵢBᵢAᵢ‖_F over all LoRA layers together.

    `locals_` are the platforms' full adapters after local training (global + update), `new_global`
    the aggregated adapter and `merged` what a strategy folded into the base weights this round,
    as factors (B_m, A_m) per layer, so the base's change is B_m·A_m. None when there are no
    LoRA layers or the target is zero. One Gram per layer serves numerator and denominator.
    """
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    n = len(locals_)
    num = den = 0.0
    for layer in layers(new_global):
        ak, bk = a_key(new_global, layer), b_key(new_global, layer)
        bs = [loc[bk] for loc in locals_] + [new_global[bk]]
        as_ = [loc[ak] for loc in locals_] + [new_global[ak]]
        if merged and layer in merged:
            bm, am = merged[layer]
            bs, as_ = [*bs, bm], [*as_, am]
        c = np.concatenate([p, -np.ones(len(bs) - n)])
        k = product_gram(bs, as_)
        num += max(float(c @ k @ c), 0.0)
        den += max(float(p @ k[:n, :n] @ p), 0.0)
    return float(np.sqrt(num / den)) if den > 0 else None


def local_states(global_state: AdapterState, updates: list[AdapterState]) -> list[AdapterState]:
    """Each platform's adapter after training: global + its update (on the keys it sent)."""
    return [{k: global_state[k] + u[k] if k in u else global_state[k] for k in global_state} for u in updates]


def update_to_global_rank(
    update: AdapterState, global_state: AdapterState, rank: int, alpha: float, global_rank: int
) -> AdapterState:
    """A rank-`rank` platform's update as an update of the global (rank `global_rank`) adapter:
    its local adapter zero-padded, minus the global. The components it does not have count as
    zero in the average — HetLoRA's zero-padding aggregation (Cho et al., EMNLP 2024)."""
    if rank == global_rank:
        return update
    local = to_rank(global_state, rank, alpha, global_rank)
    local = {k: local[k] + update[k] if k in update else local[k] for k in local}
    padded = from_rank(local, rank, alpha, global_rank)
    return {k: padded[k] - global_state[k] for k in update}


# --- ranks that differ per platform (HetLoRA-style zero padding) ---------------------------------


def to_rank(state: AdapterState, rank: int, alpha: float, global_rank: int) -> AdapterState:
    """The global adapter (rank `global_rank`) as a rank-`rank` adapter: keep the first `rank`
    components, and rescale B so that s_i·B_i·A_i equals the global s·B·A on them (s = α/r)."""
    if rank == global_rank:
        return state
    ratio = np.float32((alpha / global_rank) / (alpha / rank))  # s_global / s_i
    out = {}
    for k, v in state.items():
        if is_a(k):
            out[k] = v[:rank, :]
        elif is_b(k):
            out[k] = v[:, :rank] * ratio
        else:
            out[k] = v
    return out


def from_rank(state: AdapterState, rank: int, alpha: float, global_rank: int) -> AdapterState:
    """A rank-`rank` adapter (or update) in the global rank's coordinates: zero-padded factors,
    B rescaled so that the global scale reproduces s_i·B_i·A_i exactly."""
    if rank == global_rank:
        return state
    ratio = np.float32((alpha / rank) / (alpha / global_rank))  # s_i / s_global
    out = {}
    for k, v in state.items():
        if is_a(k):
            out[k] = np.concatenate([v, np.zeros((global_rank - rank, v.shape[1]), v.dtype)], axis=0)
        elif is_b(k):
            out[k] = np.concatenate([v * ratio, np.zeros((v.shape[0], global_rank - rank), v.dtype)], axis=1)
        else:
            out[k] = v
    return out


class ExactMerge(Strategy):
    """A strategy that merges the exact average of the platforms' products B·A into the base
    weights (FedEx-LoRA, FLoRA): it reads each platform's factors, and is exact only for the plain
    weighted mean at step size 1."""

    needs_locals = True
    merges_into_base = True

    @property
    def keys(self) -> tuple[str, ...]:
        return self.params  # no server_lr, no robust rule: both would break the exactness

    def shared_host_conflict(self) -> str | None:
        return f"strategy.name={self.name} merges into each platform's frozen weights, which the host shares"

    def check(self, cfg, cohort: int) -> None:
        super().check(cfg, cohort)
        if cfg.strategy.robust != "none":
            raise UserError(
                f"config key 'strategy.robust' must be none with strategy.name={self.name}: it is exact only "
                "for the plain weighted mean of the factors"
            )
        if cfg.strategy.server_lr not in (None, 1.0):
            raise UserError(
                f"config key 'strategy.server_lr' must be null or 1 with strategy.name={self.name}: its "
                "merge into the base weights is exact only for the plain average"
            )
