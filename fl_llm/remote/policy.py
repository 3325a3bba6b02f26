"""What a platform service releases, decided by the platform: its policy and its privacy ledger.

The policy (`serve.policy` in the platform's own config) is checked against the coordinator's job
when it starts (`refusals`): a job that breaks a rule is refused with a message naming the
platform and the rule. The ledger (`Ledger`, a JSON file in the platform's own state dir) records
every update the platform released under record-level DP — its sample rate, noise multiplier and
steps — over every job on this data, and composes them with the same accountant as a run does
(PLD, `fl_llm.privacy.accountant`): `serve.policy.max_epsilon` caps that total, before a job
starts (its whole plan) and again before each round it trains (a coordinator that asks for more
rounds than it announced is refused there).

Only record-level DP is the platform's own to enforce: it adds the noise itself. Client-level DP
is added by the coordinator; a platform may require it (`require: [client_dp]`), which records that
it trusts the coordinator to add it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fl_llm.config import RunConfig
from fl_llm.privacy.accountant import Mechanism, epsilon_of

REQUIREMENTS = {
    "record_dp": ("record-level DP (privacy.dp.level=record)", lambda job: job.privacy.dp.level == "record"),
    "client_dp": ("client-level DP (privacy.dp.level=client)", lambda job: job.privacy.dp.level == "client"),
    "secagg": ("secure aggregation (privacy.secagg.enabled=true)", lambda job: job.privacy.secagg.enabled),
}


def refusals(policy, job: RunConfig, name: str, planned: list[tuple[Mechanism, int]], ledger: Ledger) -> list[str]:
    """Every rule of `policy` the job breaks, one line each naming platform `name` and the rule.
    `planned`: the record-level DP releases the job would make here ([] without record-level DP)."""
    out = []
    where = f"platform {name!r} refuses the job: its policy"
    for rule in policy.require:
        what, holds = REQUIREMENTS[rule]
        if not holds(job):
            out.append(f"{where} requires {what}")
    if policy.strategies and job.strategy.name not in policy.strategies:
        out.append(f"{where} accepts strategy.name in {list(policy.strategies)}, not {job.strategy.name!r}")
    if policy.max_rounds is not None and job.server.rounds > policy.max_rounds:
        out.append(f"{where} allows at most {policy.max_rounds} rounds (server.rounds={job.server.rounds})")
    if policy.max_epsilon is not None:
        if job.privacy.delta > policy.max_delta:
            out.append(f"{where} allows δ ≤ {policy.max_delta:g} (privacy.delta={job.privacy.delta:g})")
        if job.privacy.dp.level != "record":
            out.append(
                f"{where} caps ε at {policy.max_epsilon:g}, which needs record-level DP (privacy.dp.level=record): "
                "the noise this platform adds itself"
            )
        else:
            total = ledger.epsilon(policy.max_delta, planned)
            if total > policy.max_epsilon:
                out.append(
                    f"{where} caps ε at {policy.max_epsilon:g} (δ = {policy.max_delta:g}) over every job on its data; "
                    f"spent so far {ledger.epsilon(policy.max_delta):.3g}, with this job's plan {total:.3g}"
                )
    return out


def reported(policy, answer: dict) -> dict:
    """An evaluation answer with only the metrics the policy reports (eval_loss and num_eval always:
    the round loop weighs and records them)."""
    if not policy.metrics:
        return answer
    keep = {"eval_loss", "num_eval", *policy.metrics}
    return {k: v for k, v in answer.items() if k in keep}


class Ledger:
    """Every record-level DP release of this platform's data, kept on its own disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def spent(self) -> list[tuple[Mechanism, int]]:
        return [(Mechanism(e["noise"], e["sample_rate"]), e["steps"]) for e in self.entries]

    def epsilon(self, delta: float, more: list[tuple[Mechanism, int]] = ()) -> float:
        return epsilon_of([*self.spent(), *more], delta)

    def book(self, job: str, round_: int, attempt: int, mechanism: Mechanism, steps: int) -> None:
        """One released update, written before the update leaves (atomically: temp file + rename)."""
        self.entries.append(
            {"job": job, "round": round_, "attempt": attempt, "steps": int(steps),
             "sample_rate": mechanism.sample_rate, "noise": mechanism.noise_multiplier}
        )  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.path)
