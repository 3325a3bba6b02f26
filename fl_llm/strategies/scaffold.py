"""SCAFFOLD: control variates correct each platform's drift toward its own optimum.

Paper: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020 (Algorithm 1, option II).

    platform step:  y ← y − ηₗ·(gᵢ(y) − cᵢ + c)                  (K local SGD steps from x)
    after K steps:  cᵢ⁺ = cᵢ − c + (x − y)/(K·ηₗ);  sends Δyᵢ = y − x and Δcᵢ = cᵢ⁺ − cᵢ
    server:         x ← x + η_g·mean(Δyᵢ);  c ← c + (|S|/N)·mean(Δcᵢ)

Option II assumes plain SGD local steps, so SCAFFOLD runs with `client.optimizer=sgd`. cᵢ is the
platform's own state (kept by it, checkpointed); c travels with the global adapter, and Δcᵢ
doubles the upload.
"""

from __future__ import annotations

import numpy as np

from fl_llm.errors import UserError
from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.tensors import AdapterState


def corrected_gradient(grad, c_i, c):
    """gᵢ(y) − cᵢ + c, for one parameter (torch or numpy)."""
    return grad - c_i + c


def client_control_update(c_i: AdapterState, c: AdapterState, delta_y: AdapterState, steps: int, lr: float):
    """(cᵢ⁺, Δcᵢ) from option II: cᵢ⁺ = cᵢ − c + (x − y)/(K·ηₗ) = cᵢ − c − Δy/(K·ηₗ)."""
    new = {k: (c_i[k] - c[k] - delta_y[k] / np.float32(steps * lr)).astype(np.float32) for k in c_i}
    return new, {k: (new[k] - c_i[k]).astype(np.float32) for k in new}


def server_control_update(c: AdapterState, delta_cs: list[AdapterState], num_platforms: int) -> AdapterState:
    """c ← c + (|S|/N)·mean(Δcᵢ) = c + Σ Δcᵢ / N."""
    return {k: (c[k] + sum(d[k] for d in delta_cs) / np.float32(num_platforms)).astype(np.float32) for k in c}


class Scaffold(Strategy):
    def round_weights(self, weights):
        return [1.0] * len(weights)  # the paper averages uniformly

    def end_round(self, state, global_state: AdapterState, extras, num_platforms: int):
        """c ← c + Σ Δcᵢ / N from the Δcᵢ the platforms sent with their updates."""
        c = state.get("c") or {k: np.zeros_like(v) for k, v in global_state.items()}
        state["c"] = server_control_update(c, [e["c"] for e in extras or []], num_platforms)
        return state

    def needs_individual_updates(self, configured_rule: str) -> bool:
        return True  # each Δcᵢ in the clear

    def shared_host_conflict(self) -> str | None:
        return "strategy.name=scaffold keeps per-parameter control variates keyed to one adapter per model"

    def check(self, cfg, cohort: int) -> None:
        super().check(cfg, cohort)
        if cfg.model.lora.ranks and len(set(cfg.model.lora.ranks)) > 1:
            raise UserError("strategy.name=scaffold needs one LoRA rank for all platforms (model.lora.ranks)")
        if cfg.client.optimizer != "sgd":
            raise UserError(
                "config key 'client.optimizer' must be sgd with strategy.name=scaffold: its control variates "
                "(option II) assume plain SGD local steps; set client.optimizer=sgd (and a larger client.lr)"
            )


STRATEGY = Scaffold(
    "scaffold",
    "Karimireddy et al., SCAFFOLD, ICML 2020",
    "control variates correct client drift (needs client.optimizer=sgd; doubles the upload)",
    FEDAVG,
    local_term="scaffold",
)
