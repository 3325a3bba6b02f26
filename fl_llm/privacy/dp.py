"""The differential-privacy mechanisms as small pure functions (formulas: ALGORITHMS.md).

    record level   DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016):
                   clip each example's gradient to C, sum, add N(0, (z·C)²), divide by the expected
                   batch size q·N (Poisson sampling makes the batch size itself random)
    client level   DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
                   Models", ICLR 2018): clip each platform's update to C, sum with uniform weights,
                   add N(0, (z·C)²), divide by the expected cohort size m
    DP-AdamBC      Tang et al., "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You Apply Bias
                   Correction)", AAAI 2024: AdamW after DP-SGD's noise, with the noise's known
                   variance taken out of the second moment (post-processing: no ε spent)
    adaptive clip  Andrew et al., "Differentially Private Learning with Adaptive Clipping",
                   NeurIPS 2021: move C geometrically toward the γ-quantile of the update norms,
                   from a noised count of the updates that were not clipped

The noise comes from the generator the caller passes: a ChaCha20 keystream keyed from the
operating system (`fl_llm.privacy.csprng`, privacy.dp.secure_rng, the default), or numpy's seeded
from the run seed for reproducible experiments.
"""

from __future__ import annotations

import math

import numpy as np

from fl_llm.tensors import AdapterState, flatten, unflatten

# --- record level: one DP-SGD step --------------------------------------------------------------


def clip_factors(norms, clip: float):
    """min(1, C/‖g‖) per example (torch or numpy): the scale that brings each norm to at most C."""
    return (
        (clip / (norms + 1e-12)).clamp(max=1.0) if hasattr(norms, "clamp") else np.minimum(1.0, clip / (norms + 1e-12))
    )


def private_gradient(
    per_example: list, clip: float, noise_multiplier: float, expected_batch: float, generator, group=None
):
    """DP-SGD's gradient from per-example gradients (each a tensor [B, *shape]; B may be 0).

    Returns (gradients, stats): Σᵢ clip(gᵢ) + N(0, (z·C)²) per coordinate, over q·N; stats has the
    batch size, the mean per-example norm before clipping and the fraction clipped. `group`: a
    platform's workers (`fl_llm.client.parallel.Group`), each holding its share of the batch: each
    clips its own examples, the noise is drawn once, on rank 0, and the sums are added up — one
    platform step, one noise draw, whatever the number of workers."""
    import torch

    batch = per_example[0].shape[0]
    if batch:
        norms = torch.sqrt(sum(g.reshape(batch, -1).pow(2).sum(1) for g in per_example))
        scale = clip_factors(norms, clip)
        summed = [torch.einsum("b,b...->...", scale, g) for g in per_example]
        stats = {"batch": batch, "grad_norm": float(norms.mean()), "clipped": float((norms > clip).float().mean())}
    else:  # an empty Poisson batch still releases noise
        summed = [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in per_example]
        stats = {"batch": 0, "grad_norm": 0.0, "clipped": 0.0}
    std = noise_multiplier * clip if noise_multiplier else 0.0  # z = 0: no noise, even with C = ∞
    if group is not None and group.rank != 0:
        std = 0.0  # rank 0's draw is the platform's one noise
    noised = []
    for s in summed:
        noise = standard_normal(generator, tuple(s.shape)).to(s.device, s.dtype) if std else 0.0
        noised.append(s + std * noise)
    if group is not None:
        noised = group.sum_tensors(noised)
        b = stats["batch"]
        batch, norms, clipped = group.total([b, stats["grad_norm"] * b, stats["clipped"] * b])
        stats = {"batch": int(batch), "grad_norm": norms / max(batch, 1), "clipped": clipped / max(batch, 1)}
    return [s / expected_batch for s in noised], stats


def standard_normal(generator, shape: tuple):
    """N(0, 1) draws as a float32 torch tensor, from a torch.Generator or a numpy-style generator
    (`fl_llm.privacy.csprng.ChaChaRandom`)."""
    import torch

    if isinstance(generator, torch.Generator):
        return torch.normal(0.0, 1.0, size=shape, generator=generator)
    return torch.from_numpy(np.asarray(generator.normal(0.0, 1.0, size=shape), np.float32))


def adambc_denominator(v_hat, noise_var: float, floor: float, eps: float = 1e-8):
    """DP-AdamBC's denominator (torch): √max(v̂ − σ², (κσ)²) + ε, for v̂ AdamW's bias-corrected
    second moment and σ² = (z·C / (q·N))² the variance DP-SGD's noise adds to each coordinate of
    the mean gradient. Under DP, v̂ ≈ g² + σ²: AdamW divides by the noise and becomes SGD with
    lr/σ wherever |g| < σ; taking σ² out restores the per-coordinate scaling. The floor κ·σ caps
    the step where v̂ is no larger than the noise (κ = 1: about AdamW's denominator there).
    σ² = 0 (no DP): AdamW's own √v̂ + ε."""
    return (v_hat - noise_var).clamp(min=floor * floor * noise_var).sqrt() + eps


class AdamBC:
    """AdamW (decoupled weight decay, β = (0.9, 0.999)) with DP-AdamBC's denominator
    (`adambc_denominator`). `state` (t and the moments m, v per parameter, numpy)
    carries the moments from one round to the next: a second moment estimated from 5 noisy
    steps is itself mostly noise. `lr`: one rate, or one per parameter."""

    def __init__(self, params, *, lr, weight_decay, noise_var, floor, eps=1e-8, state=None):
        import torch

        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.noise_var, self.floor, self.eps, self.betas = noise_var, floor, eps, (0.9, 0.999)
        self.t = int(state["t"]) if state else 0
        self.m, self.v = (
            [torch.from_numpy(np.asarray(a, np.float32)).to(p.device) for a, p in zip(state[k], params)]
            if state
            else [torch.zeros_like(p) for p in params]
            for k in ("m", "v")
        )

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        rates = self.lr if isinstance(self.lr, list) else [self.lr] * len(self.params)
        with torch.no_grad():
            for p, m, v, lr in zip(self.params, self.m, self.v, rates):
                g = p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = adambc_denominator(v / (1 - b2**self.t), self.noise_var, self.floor, self.eps)
                p.mul_(1 - lr * self.weight_decay)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state(self) -> dict:
        return {"t": self.t, "m": [a.cpu().numpy() for a in self.m], "v": [a.cpu().numpy() for a in self.v]}


def poisson_batch(n: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson-sampled batch: each of n examples independently with probability q."""
    return np.flatnonzero(rng.random(n) < sample_rate)


# --- client level: DP-FedAvg on the driver ------------------------------------------------------


def clip_update(update: AdapterState, clip: float) -> tuple[AdapterState, float]:
    """(the update scaled to L2 norm at most C, its norm before clipping)."""
    vec, layout = flatten([update])
    norm = float(np.linalg.norm(vec[0]))
    return unflatten(vec[0] * float(clip_factors(norm, clip)), layout), norm


def dp_mean(
    updates: list[AdapterState], clip: float, noise_std_multiplier: float, expected: int, rng
) -> tuple[AdapterState, int]:
    """((Σ clip(Δᵢ) + N(0, (z·C)²)) / m, the number of updates that needed no clipping) with
    uniform weights and the fixed denominator m: adding or removing one platform moves the sum by
    at most C, whatever the others sent. The count is private: only its noised, centred form may
    be released (`adaptive_clip`)."""
    clipped, norms = zip(*(clip_update(u, clip) for u in updates))
    vec, layout = flatten(list(clipped))
    unclipped = sum(1 for n in norms if n <= clip)
    return unflatten(noised_mean(vec.sum(0), clip, noise_std_multiplier, expected, rng), layout), unclipped


def noised_mean(total: np.ndarray, clip: float, noise_std_multiplier: float, expected: int, rng) -> np.ndarray:
    """(Σ clip(Δᵢ) + N(0, (z·C)²)) / m from the sum of the clipped updates — all the driver has
    under secure aggregation, where each platform clips its own update before masking it."""
    total = np.asarray(total, np.float64)
    if noise_std_multiplier:
        total = total + rng.normal(0.0, noise_std_multiplier * clip, size=total.shape)
    return total / expected


def adaptive_noise_multipliers(noise_multiplier: float, expected: int) -> tuple[float, float]:
    """(z_Δ for the update, σ_b for the centred clip count) so that together they spend z:
    σ_b = m/20, z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Theorem 1). The count's noise
    multiplier is σ_b ÷ its sensitivity ½ = 2σ_b; two Gaussians of multipliers z_Δ and 2σ_b
    released together are one of multiplier (z_Δ⁻² + (2σ_b)⁻²)^(−1/2) = z."""
    sigma_b = expected / 20.0
    rest = noise_multiplier**-2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping needs the noise multiplier z below 2·σ_b = m/10 = {2 * sigma_b:g} "
            f"(m = {expected} platforms per round), got z = {noise_multiplier:g}"
        )
    return 1.0 / math.sqrt(rest), sigma_b


def centred_bit(update_norm: float, clip: float) -> int:
    """What one platform adds to the clip count, doubled to stay an integer: 2·(bᵢ − ½) = ±1 with
    bᵢ = 1[‖Δᵢ‖ ≤ C]. Under secure aggregation each platform sends this, so the driver learns
    only Σ(bᵢ − ½), whose sensitivity to adding or removing a platform is ½."""
    return 1 if update_norm <= clip else -1


def adaptive_clip(
    clip: float,
    centred_count: float,
    expected: int,
    sigma_b: float,
    rng,
    target_quantile: float = 0.5,
    lr: float = 0.2,
) -> float:
    """C ← C·exp(−η·(b̃ − γ)) with b̃ = (Σ(bᵢ − ½) + N(0, σ_b²)) / m + ½, `centred_count` the sum
    Σ(bᵢ − ½) over the round's updates (under secure aggregation: half the sum of the platforms'
    masked `centred_bit`s). Centred, each platform moves it by ½ whether it is added or removed;
    the uncentred count Σ bᵢ moves by 1 and would need twice the noise for the same privacy."""
    noisy = (centred_count + rng.normal(0.0, sigma_b)) / expected + 0.5
    return float(clip * math.exp(-lr * (noisy - target_quantile)))
