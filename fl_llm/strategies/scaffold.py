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
