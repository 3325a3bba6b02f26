"""(ε, δ) accounting with Google's `dp-accounting` library, and the run's privacy ledger.

Events (ALGORITHMS.md, "Differential privacy"):
    record level   every local DP-SGD step is a Poisson-sampled Gaussian: PoissonSampled(q, Gaussian(z))
    client level   every round is a Gaussian on the platforms' clipped mean: all platforms take part
                   → Gaussian(z); a fixed cohort of k of n → SampledWithoutReplacement(n, k, Gaussian(z))
composed over every step (or round) actually run. The privacy loss distribution (PLD, Koskela et
al. 2020; Doroshenko et al. 2022) is the primary accountant; Rényi DP (Mironov 2017) is reported
beside it as a cross-check and used where PLD has no support (sampling without replacement).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

# dp-accounting logs through absl; its RDP order search warns about orders it skips. Not news.
logging.getLogger("absl").setLevel(logging.ERROR)

PLD_DISCRETIZATION = 1e-3  # pessimistic PLD grid: ε is rounded up, never down
# Below this noise multiplier ε runs into the thousands and the PLD grid into gigabytes: such
# (meaningless) budgets are accounted with RDP, which costs the same at any noise.
PLD_MIN_NOISE = 0.1


@dataclass(frozen=True)
class Mechanism:
    """One release, repeated: a Gaussian of noise multiplier z, sampled with probability
    `sample_rate` (Poisson), or a cohort of `cohort` drawn from `population` without replacement."""

    noise_multiplier: float
    sample_rate: float = 1.0
    population: int = 0  # >0: sampling without replacement of `cohort` out of `population`
    cohort: int = 0

    def event(self, count: int):
        import dp_accounting as dpa

        gauss = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.population and self.cohort < self.population:
            one = dpa.SampledWithoutReplacementDpEvent(self.population, self.cohort, gauss)
        elif self.sample_rate < 1.0:
            one = dpa.PoissonSampledDpEvent(self.sample_rate, gauss)
        else:
            one = gauss
        return dpa.SelfComposedDpEvent(one, int(count))

    @property
    def pld_supported(self) -> bool:
        sampled_without_replacement = self.population and self.cohort < self.population
        return not sampled_without_replacement and self.noise_multiplier >= PLD_MIN_NOISE


def _accountant(kind: str, mechanism: Mechanism, discretization: float = PLD_DISCRETIZATION):
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    if kind == "pld" and mechanism.pld_supported:
        return pld.PLDAccountant(value_discretization_interval=discretization)
    if not (mechanism.population and mechanism.cohort < mechanism.population):
        return rdp.RdpAccountant()
    # sampling without replacement: RDP supports it under the replace-one relation only
    return rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)


def epsilon(mechanism: Mechanism, count: int, delta: float, kind: str = "pld") -> float:
    """ε(δ) after `count` releases of `mechanism` (0 for none; inf for zero noise)."""
    if count <= 0:
        return 0.0
    if mechanism.noise_multiplier <= 0:
        return math.inf
    acc = _accountant(kind, mechanism)
    acc.compose(mechanism.event(count))
    return float(acc.get_epsilon(delta))


def accountant_used(mechanism: Mechanism, kind: str) -> str:
    return kind if mechanism.pld_supported else "rdp"


def calibrate(target_epsilon: float, delta: float, count: int, mechanism: Mechanism, kind: str = "pld") -> float:
    """The smallest noise multiplier z (to 0.2%) whose ε after `count` releases is at most
    `target_epsilon`, checked with the same accountant that reports ε during the run.

    RDP (fast, an upper bound on ε) brackets the answer from above; dp-accounting's calibration
    then searches that bracket with the primary accountant on a coarse grid, and the result is
    nudged up until the fine grid agrees."""
    from dp_accounting import mechanism_calibration as mc

    def with_z(z: float) -> Mechanism:
        return Mechanism(z, mechanism.sample_rate, mechanism.population, mechanism.cohort)

    def search(kind_: str, bracket, discretization: float) -> float:
        return float(
            mc.calibrate_dp_mechanism(
                lambda: _accountant(kind_, mechanism, discretization),
                lambda z: with_z(z).event(count),
                target_epsilon,
                delta,
                bracket,
                tol=1e-3,
            )
        )

    z = search("rdp", mc.LowerEndpointAndGuess(0.05, 1.0), PLD_DISCRETIZATION)
    if kind == "pld" and Mechanism(z, mechanism.sample_rate, mechanism.population, mechanism.cohort).pld_supported:
        lower = max(z / 2, PLD_MIN_NOISE)
        if epsilon(with_z(lower), count, delta, kind) > target_epsilon:
            z = search("pld", mc.ExplicitBracketInterval(lower, z), 1e-2)
        else:  # even the least noise PLD handles is enough: keep it (slightly more than needed)
            z = lower
    while epsilon(with_z(z), count, delta, kind) > target_epsilon:  # the fine grid may round up
        z *= 1.002
    return z


@dataclass
class Party:
    """One accounted party: a platform (record level) or the federation (client level)."""

    mechanism: Mechanism
    releases: int = 0  # steps (record level) or rounds (client level) run so far
    epsilons: list[float] = field(default_factory=list)  # ε after each round


@dataclass
class Ledger:
    """Every privacy-relevant release of the run, carried in checkpoints and saved as privacy.json."""

    level: str
    delta: float
    target_epsilon: float | None
    accountant: str
    parties: dict[str, Party] = field(default_factory=dict)

    def epsilon_after(self, name: str, more: int = 0) -> float:
        party = self.parties[name]
        return epsilon(party.mechanism, party.releases + more, self.delta, self.accountant)

    def would_exceed(self, name: str, more: int) -> float | None:
        """ε that `more` releases by `name` would reach, if that passes the target; else None."""
        if self.target_epsilon is None:
            return None
        eps = self.epsilon_after(name, more)
        return eps if eps > self.target_epsilon else None

    def record(self, name: str, releases: int) -> float:
        party = self.parties[name]
        party.releases += releases
        eps = party.epsilons[-1] if releases == 0 and party.epsilons else self.epsilon_after(name)
        party.epsilons.append(eps)
        return eps

    def cross_check(self, name: str) -> float:
        """ε of `name` so far by the other accountant (RDP when PLD is primary, and vice versa)."""
        party = self.parties[name]
        other = "rdp" if self.accountant == "pld" else "pld"
        return epsilon(party.mechanism, party.releases, self.delta, other)

    def state(self) -> dict:
        return {
            "level": self.level,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "parties": {
                name: {
                    "noise_multiplier": p.mechanism.noise_multiplier,
                    "sample_rate": p.mechanism.sample_rate,
                    "population": p.mechanism.population,
                    "cohort": p.mechanism.cohort,
                    "accountant": accountant_used(p.mechanism, self.accountant),
                    "releases": p.releases,
                    "epsilon": p.epsilons[-1] if p.epsilons else 0.0,
                    "epsilon_per_round": p.epsilons,
                }
                for name, p in self.parties.items()
            },
        }

    def report(self) -> dict:
        """`state()` plus each party's ε by the other accountant: what privacy.json shows."""
        out = self.state()
        for name, party in out["parties"].items():
            party["epsilon_cross_check"] = self.cross_check(name)
        return out

    @classmethod
    def from_state(cls, state: dict) -> Ledger:
        parties = {
            name: Party(
                Mechanism(
                    float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["population"]), int(p["cohort"])
                ),
                int(p["releases"]),
                [float(e) for e in p["epsilon_per_round"]],
            )
            for name, p in state["parties"].items()
        }
        return cls(state["level"], float(state["delta"]), state["target_epsilon"], state["accountant"], parties)
