"""(ε, δ) accounting with Google's `dp-accounting` library, and the run's privacy ledger.

Events (ALGORITHMS.md, "Differential privacy"), all under the add/remove-one neighbouring relation:
    record level   every local DP-SGD step is a Poisson-sampled Gaussian: PoissonSampled(q, Gaussian(z))
    client level   every round is a Gaussian on the platforms' clipped sum: all platforms take part
                   → Gaussian(z); a sampled cohort (each platform joins with probability q = k/n,
                   from the OS's cryptographic source) → PoissonSampled(q, Gaussian(z))
composed over every step (or round) actually run. A party's mechanism may change during a run
(client level: q grows when a platform is excluded, since the population is the platforms still
in the federation), so the ledger keeps each mechanism with the number of releases made under it.
The privacy loss distribution (PLD, Koskela et al. 2020; Doroshenko et al. 2022) is the primary
accountant; Rényi DP (Mironov 2017) is reported beside it as a cross-check.

Why not a fixed-size cohort: k of n drawn without replacement is analysed under the replace-one
relation, where one platform moves the clipped sum by up to 2C, so the Gaussian's multiplier there
is z/2 — for n = 100, k = 10, z = 1 and 100 rounds that is ε ≈ 84, against ε ≈ 7 for Poisson
sampling at the same q and noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from fl_llm.errors import UserError

# dp-accounting logs through absl; its RDP order search warns about orders it skips. Not news.
logging.getLogger("absl").setLevel(logging.ERROR)

PLD_DISCRETIZATION = 1e-3  # pessimistic PLD grid: ε is rounded up, never down
# Below this noise multiplier ε runs into the thousands and the PLD grid into gigabytes: such
# (meaningless) budgets are accounted with RDP, which costs the same at any noise.
PLD_MIN_NOISE = 0.1


@dataclass(frozen=True)
class Mechanism:
    """One release: a Gaussian of noise multiplier z (noise std ÷ the sensitivity under add/remove),
    on a Poisson sample of rate `sample_rate` (1: everyone, no sampling)."""

    noise_multiplier: float
    sample_rate: float = 1.0

    def one(self):
        import dp_accounting as dpa

        gauss = dpa.GaussianDpEvent(self.noise_multiplier)
        return dpa.PoissonSampledDpEvent(self.sample_rate, gauss) if self.sample_rate < 1.0 else gauss

    def event(self, count: int):
        import dp_accounting as dpa

        return dpa.SelfComposedDpEvent(self.one(), int(count))

    @property
    def pld_supported(self) -> bool:
        return self.noise_multiplier >= PLD_MIN_NOISE


def composed_event(spent: list[tuple[Mechanism, int]]):
    """The DP event of every release: each mechanism composed as often as it was used."""
    import dp_accounting as dpa

    return dpa.ComposedDpEvent([m.event(c) for m, c in spent if c > 0])


def _accountant(kind: str, mechanisms, discretization: float = PLD_DISCRETIZATION):
    from dp_accounting import pld, rdp

    if kind == "pld" and all(m.pld_supported for m in mechanisms):
        return pld.PLDAccountant(value_discretization_interval=discretization)
    return rdp.RdpAccountant()


def epsilon_of(spent: list[tuple[Mechanism, int]], delta: float, kind: str = "pld") -> float:
    """ε(δ) after every release in `spent` (0 for none; inf when any release had zero noise)."""
    spent = [(m, int(c)) for m, c in spent if c > 0]
    if not spent:
        return 0.0
    if any(m.noise_multiplier <= 0 for m, _ in spent):
        return math.inf
    acc = _accountant(kind, [m for m, _ in spent])
    acc.compose(composed_event(spent))
    return float(acc.get_epsilon(delta))


def epsilon(mechanism: Mechanism, count: int, delta: float, kind: str = "pld") -> float:
    """ε(δ) after `count` releases of `mechanism` (0 for none; inf for zero noise)."""
    return epsilon_of([(mechanism, count)], delta, kind)


def accountant_used(mechanisms, kind: str) -> str:
    return kind if kind == "pld" and all(m.pld_supported for m in mechanisms) else "rdp"


def calibrate(target_epsilon: float, delta: float, count: int, mechanism: Mechanism, kind: str = "pld") -> float:
    """The smallest noise multiplier z (to 0.2%) whose ε after `count` releases is at most
    `target_epsilon`, checked with the same accountant (and the same event) that reports ε during
    the run.

    RDP (fast, an upper bound on ε) brackets the answer from above; dp-accounting's calibration
    then searches that bracket with the primary accountant on a coarse grid, and the result is
    nudged up until the fine grid agrees."""
    from dp_accounting import mechanism_calibration as mc

    def with_z(z: float) -> Mechanism:
        return Mechanism(z, mechanism.sample_rate)

    def search(kind_: str, bracket, discretization: float) -> float:
        return float(
            mc.calibrate_dp_mechanism(
                lambda: _accountant(kind_, [mechanism], discretization),
                lambda z: with_z(z).event(count),
                target_epsilon,
                delta,
                bracket,
                tol=1e-3,
            )
        )

    z = search("rdp", mc.LowerEndpointAndGuess(0.05, 1.0), PLD_DISCRETIZATION)
    if kind == "pld" and with_z(z).pld_supported:
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
    """One accounted party: a platform (record level) or the federation (client level).
    `mechanism` is what the next release will be; `spent` every release so far, as
    [mechanism, how many] in the order they were made."""

    mechanism: Mechanism
    spent: list[tuple[Mechanism, int]] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)  # ε after each round

    @property
    def releases(self) -> int:
        return sum(c for _, c in self.spent)

    def book(self, count: int) -> None:
        if count <= 0:
            return
        if self.spent and self.spent[-1][0] == self.mechanism:
            self.spent[-1] = (self.mechanism, self.spent[-1][1] + count)
        else:
            self.spent.append((self.mechanism, count))


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
        return epsilon_of([*party.spent, (party.mechanism, more)], self.delta, self.accountant)

    def would_exceed(self, name: str, more: int) -> float | None:
        """ε that `more` releases by `name` would reach, if that passes the target; else None."""
        if self.target_epsilon is None:
            return None
        eps = self.epsilon_after(name, more)
        return eps if eps > self.target_epsilon else None

    def record(self, name: str, releases: int) -> float:
        party = self.parties[name]
        party.book(releases)
        eps = party.epsilons[-1] if releases == 0 and party.epsilons else self.epsilon_after(name)
        party.epsilons.append(eps)
        return eps

    def cross_check(self, name: str) -> float:
        """ε of `name` so far by the other accountant (RDP when PLD is primary, and vice versa)."""
        other = "rdp" if self.accountant == "pld" else "pld"
        return epsilon_of(self.parties[name].spent, self.delta, other)

    def state(self) -> dict:
        def mech(m: Mechanism) -> dict:
            return {"noise_multiplier": m.noise_multiplier, "sample_rate": m.sample_rate}

        return {
            "level": self.level,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "neighbouring_relation": "add/remove one " + ("record" if self.level == "record" else "platform"),
            "parties": {
                name: {
                    **mech(p.mechanism),
                    "spent": [{**mech(m), "releases": c} for m, c in p.spent],
                    "accountant": accountant_used([p.mechanism, *(m for m, _ in p.spent)], self.accountant),
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
        parties = {}
        for name, p in state["parties"].items():
            if int(p.get("population", 0)):
                raise UserError(
                    "--resume: this run's privacy ledger booked a fixed-size cohort with an accountant that "
                    "under-reported ε (sampling without replacement under the wrong neighbouring relation); "
                    "its ε cannot be continued honestly: start a new run"
                )
            spent = [
                (Mechanism(float(s["noise_multiplier"]), float(s["sample_rate"])), int(s["releases"]))
                for s in p.get("spent", [])
            ]
            if "spent" not in p and int(p["releases"]):  # a ledger written before mechanisms could change
                spent = [(Mechanism(float(p["noise_multiplier"]), float(p["sample_rate"])), int(p["releases"]))]
            parties[name] = Party(
                Mechanism(float(p["noise_multiplier"]), float(p["sample_rate"])),
                spent,
                [float(e) for e in p["epsilon_per_round"]],
            )
        return cls(state["level"], float(state["delta"]), state["target_epsilon"], state["accountant"], parties)
