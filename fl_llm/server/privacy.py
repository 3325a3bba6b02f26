"""The driver's side of differential privacy: the ledger, the budget, and DP-FedAvg's noisy mean.

    record level   each platform runs DP-SGD itself; the driver books every local step of every
                   update it receives against that platform's (ε, δ)
    client level   the driver clips every update to C, adds Gaussian noise to the uniform mean
                   (DP-FedAvg), optionally adapts C, and books one release per round; under
                   secure aggregation each platform clips its own update and the driver noises
                   the sum it unmasks. With server.platforms_per_round = k < n active platforms
                   each platform joins a round with probability q = k/n (Poisson sampling), drawn
                   from the OS's cryptographic source: by the driver, which hands no platform
                   the cohort; under secure aggregation by each platform itself, every active
                   platform then sending a masked update (zero when it did not join), so not
                   even the driver's messages reveal the cohort

Before a round, `exhausted` says whether it would take any party past privacy.target_epsilon;
the loop then ends the run cleanly instead. The ledger travels in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_llm.config import RunConfig
from fl_llm.errors import UserError
from fl_llm.privacy.accountant import Ledger, Mechanism, Party, calibrate
from fl_llm.privacy.csprng import dp_generator
from fl_llm.privacy.dp import adaptive_clip, adaptive_noise_multipliers, dp_mean, noised_mean
from fl_llm.tensors import AdapterState, flatten, unflatten

FEDERATION = "federation"  # the one accounted party of client-level DP


def new_ledger(cfg: RunConfig, info: dict[int, dict]) -> Ledger | None:
    """The ledger at round 0: per platform (record level, with the q and z each platform chose
    for its own data size) or for the federation (client level, z calibrated here)."""
    p = cfg.privacy
    if p.dp.level == "none":
        return None
    ledger = Ledger(p.dp.level, p.delta, p.target_epsilon, p.dp.accountant)
    if p.dp.level == "record":
        for d in info.values():
            ledger.parties[d["name"]] = Party(Mechanism(d["dp_noise_multiplier"], d["dp_sample_rate"]))
        return ledger
    n = cfg.data.num_platforms
    k = expected_cohort(cfg)
    mechanism = Mechanism(1.0, cohort_rate(cfg, n))
    z = p.dp.noise_multiplier
    if z is None:
        z = calibrate(p.target_epsilon, p.delta, cfg.server.rounds, mechanism, p.dp.accountant)
    if p.dp.adaptive_clip and z >= k / 10:
        raise UserError(
            f"privacy.dp.adaptive_clip: privacy.target_epsilon={p.target_epsilon} needs noise multiplier "
            f"z = {z:.3f}, but adaptive clipping needs z below m/10 = {k / 10:g} (m = {k} platforms per "
            "round); raise the budget, add platforms, or set privacy.dp.adaptive_clip=false"
        )
    ledger.parties[FEDERATION] = Party(Mechanism(z, mechanism.sample_rate))
    return ledger


def expected_cohort(cfg: RunConfig) -> int:
    """m: the platforms a round expects (server.platforms_per_round, or all); client-level DP's
    fixed denominator."""
    n = cfg.data.num_platforms
    k = cfg.server.platforms_per_round
    return n if k == 0 or k >= n else k


def cohort_rate(cfg: RunConfig, active: int) -> float:
    """q: each of `active` platforms joins a round with this probability under sampled
    client-level DP (the expected cohort stays k as platforms are excluded); 1 without sampling."""
    k = cfg.server.platforms_per_round
    return 1.0 if k == 0 or k >= active else k / active


@dataclass
class Privacy:
    """Ledger plus the client-level mechanism's state (the current clip norm C)."""

    cfg: RunConfig
    ledger: Ledger | None
    clip: float

    @classmethod
    def start(cls, cfg: RunConfig, info: dict[int, dict]) -> Privacy:
        return cls(cfg, new_ledger(cfg, info), cfg.privacy.dp.clip_norm)

    @classmethod
    def from_state(cls, cfg: RunConfig, state: dict | None) -> Privacy:
        if not state:
            return cls(cfg, None, cfg.privacy.dp.clip_norm)
        return cls(cfg, Ledger.from_state(state["ledger"]), float(state["clip"]))

    def check_resume(self, info: dict[int, dict]) -> None:
        """A resumed run must use the noise its ledger booked; a platform that calibrated anew
        (the budget or server.rounds changed) would spend privacy the ledger does not hold."""
        if self.level != "record":
            return
        for d in info.values():
            booked = self.ledger.parties[d["name"]].mechanism
            if (
                abs(d["dp_noise_multiplier"] - booked.noise_multiplier) > 1e-12
                or abs(d["dp_sample_rate"] - booked.sample_rate) > 1e-12
            ):
                raise UserError(
                    f"--resume: platform {d['name']} would now train with noise multiplier "
                    f"{d['dp_noise_multiplier']:.4f} and sampling rate {d['dp_sample_rate']:.4f}, but the run's privacy "
                    f"ledger booked {booked.noise_multiplier:.4f} and {booked.sample_rate:.4f} (the noise was calibrated "
                    "for the original server.rounds); resume with the original server.rounds, or start a new run"
                )

    def state(self) -> dict | None:
        return None if self.ledger is None else {"ledger": self.ledger.state(), "clip": self.clip}

    @property
    def level(self) -> str:
        return self.ledger.level if self.ledger else "none"

    def describe(self) -> str:
        if self.ledger is None:
            return "privacy: no differential privacy (privacy.dp.level=none)"
        target = self.ledger.target_epsilon
        budget = f"budget ε = {target:g}" if target is not None else "no budget set"
        rows = [
            f"privacy: {self.level}-level DP, δ = {self.ledger.delta:g}, {budget}, accountant {self.ledger.accountant}"
        ]
        for name, party in self.ledger.parties.items():
            m = party.mechanism
            if self.level == "record":
                sampling = f"q = {m.sample_rate:.4f} (Poisson sampling of records)"
            elif m.sample_rate < 1:
                sampling = f"each platform joins a round with q = {m.sample_rate:.4f} (Poisson sampling)"
            else:
                sampling = "all platforms every round"
            rows.append(f"  {name:<16} noise multiplier z = {m.noise_multiplier:.4f}, {sampling}")
        return "\n".join(rows)

    def exhausted(self, cohort_names: list[str]) -> str | None:
        """Why the next round would pass the budget (None if it would not)."""
        if self.ledger is None:
            return None
        if self.level == "client":
            parties = {FEDERATION: 1}
        else:
            parties = {name: self.cfg.client.local_steps for name in cohort_names}
        for name, more in parties.items():
            eps = self.ledger.would_exceed(name, more)
            if eps is not None:
                return (
                    f"privacy budget: one more round would take {name} to ε = {eps:.3f} > "
                    f"privacy.target_epsilon = {self.ledger.target_epsilon:g} (δ = {self.ledger.delta:g})"
                )
        return None

    def spend_training(self, results: dict[int, dict], names: dict[int, str]) -> None:
        """Record level: every update that came back released its platform's DP-SGD steps."""
        if self.level != "record":
            return
        steps = {names[i]: int(r["metrics"].get("dp_steps", 0)) for i, r in results.items()}
        for name in self.ledger.parties:  # every party gets this round's ε, trained or not
            self.ledger.record(name, steps.get(name, 0))

    # --- the cohort ------------------------------------------------------------------------

    @property
    def sampled(self) -> bool:
        """Client-level DP with a sampled cohort (Poisson sampling, amplification accounted)."""
        return self.level == "client" and self.ledger.parties[FEDERATION].mechanism.sample_rate < 1.0

    @property
    def self_sampling(self) -> bool:
        """Sampled client-level DP under secure aggregation: each platform draws its own coin."""
        return self.sampled and self.cfg.privacy.secagg.enabled

    @property
    def no_retry(self) -> bool:
        """The driver drew a Poisson cohort: the round releases whatever valid updates arrive,
        since retrying on too few would be a decision on the un-noised size of the sample."""
        return self.sampled and not self.self_sampling

    def set_population(self, active: int) -> None:
        """Client level: the accountant's population is the platforms still in the federation."""
        if self.level != "client":
            return
        party = self.ledger.parties[FEDERATION]
        q = cohort_rate(self.cfg, active)
        if party.mechanism.sample_rate < 1.0 and q != party.mechanism.sample_rate:
            party.mechanism = Mechanism(party.mechanism.noise_multiplier, q)

    def sample_rate(self) -> float:
        return self.ledger.parties[FEDERATION].mechanism.sample_rate if self.level == "client" else 1.0

    def poisson_cohort(self, active: list[int], seed: int, round_: int, attempt: int) -> list[int]:
        """Each active platform with probability q, from ChaCha20 keyed by the OS (secure_rng) —
        randomness no platform can recompute — or from the run seed (reproducible experiments)."""
        rng = dp_generator(self.cfg.privacy.dp.secure_rng, [seed, round_, attempt, 0xC04])
        joins = rng.random(len(active)) < self.sample_rate()
        return [i for i, j in zip(active, joins) if j]

    # --- client-level DP-FedAvg -----------------------------------------------------------------

    def private_mean(
        self, updates: list[AdapterState], template: AdapterState, seed: int, round_: int
    ) -> tuple[AdapterState, dict]:
        """Client level: DP-FedAvg's noisy mean of the clipped updates (and C adapted for next
        time). An empty cohort (Poisson sampling can draw one) still releases the noise."""
        rng, z_update, sigma_b, m = self._mechanism(seed, round_)
        stats = {"dp_clip_norm": self.clip}
        if updates:
            mean, unclipped = dp_mean(updates, self.clip, z_update, m, rng)
        else:
            vec, layout = flatten([template])
            mean, unclipped = unflatten(noised_mean(np.zeros(vec.shape[1]), self.clip, z_update, m, rng), layout), 0
        self._adapt(unclipped - len(updates) / 2, sigma_b, m, rng, stats)
        return mean, stats

    def private_sum(self, total: np.ndarray, centred_bits: int, seed: int, round_: int) -> tuple[np.ndarray, dict]:
        """Client level under secure aggregation: the platforms clipped their own updates to C and
        the driver holds only their sum (and the sum of their centred bits 2·(bᵢ − ½)): noise it,
        over m."""
        rng, z_update, sigma_b, m = self._mechanism(seed, round_)
        stats = {"dp_clip_norm": self.clip}
        mean = noised_mean(total, self.clip, z_update, m, rng)
        self._adapt(centred_bits / 2, sigma_b, m, rng, stats)
        return mean, stats

    def _mechanism(self, seed: int, round_: int):
        """(noise generator, the update's noise multiplier, σ_b of the clip count, m)."""
        dp = self.cfg.privacy.dp
        m = expected_cohort(self.cfg)
        z = self.ledger.parties[FEDERATION].mechanism.noise_multiplier
        rng = dp_generator(dp.secure_rng, [seed, round_, 0xD1F])
        z_update, sigma_b = adaptive_noise_multipliers(z, m) if dp.adaptive_clip else (z, 0.0)
        return rng, z_update, sigma_b, m

    def _adapt(self, centred_count: float, sigma_b: float, m: int, rng, stats: dict) -> None:
        dp = self.cfg.privacy.dp
        if dp.adaptive_clip:
            self.clip = adaptive_clip(self.clip, centred_count, m, sigma_b, rng, dp.target_quantile, dp.clip_lr)
            stats["dp_next_clip_norm"] = self.clip  # computed from the noised count: releasable

    def spend_round(self) -> None:
        if self.level == "client":
            self.ledger.record(FEDERATION, 1)

    def metrics(self, record: dict) -> None:
        """ε so far into the round's record: top-level (the largest), and per platform."""
        if self.ledger is None:
            return
        if self.level == "client":
            party = self.ledger.parties[FEDERATION]
            record["epsilon"] = party.epsilons[-1] if party.epsilons else 0.0
            record["epsilon_rdp"] = self.ledger.cross_check(FEDERATION)
            return
        eps = {}
        for name, party in self.ledger.parties.items():
            eps[name] = party.epsilons[-1] if party.epsilons else 0.0
            if name in record["platforms"]:
                record["platforms"][name]["epsilon"] = eps[name]
        record["epsilon"] = max(eps.values())
