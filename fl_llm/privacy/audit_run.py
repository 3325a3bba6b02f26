"""`fl-llm audit RUN_DIR`: membership inference against a finished run's global model.

Each platform audits itself (`Platform.audit`, where its data is, like training did): members
are its training records, non-members its held-out records, drawn with the same number of each
label on both sides; the attacks score both with the model before private training (the round-0
adapter) and with the trained global model exactly as it was evaluated (base merges, FedSA's own
B or FedPer's own head from the platform's own state dir included), and only the figures come back — AUC, TPR at low
FPR and the audited ε, checked against the run's privacy ledger. The alarm ("bound VIOLATED")
is a statement at 95% confidence for the whole run: α = 5% is divided among its
attacks × platforms (Bonferroni).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from fl_llm import checkpoint
from fl_llm.config import RunConfig, load, to_dict
from fl_llm.errors import UserError
from fl_llm.model.adapters import starting_adapter
from fl_llm.privacy.audit import record_level_guarantee
from fl_llm.tracking import RunDir, write_json

ALPHA = 0.05  # the run's alarm: a false alarm on a model within its ε at most this often
ATTACKS = 2  # loss, reference


def _final_model(run_dir: Path, cfg: RunConfig) -> tuple[dict, dict | None, int]:
    """(global adapter, base merges payload, the round whose platform state goes with them)."""
    from fl_llm.server.base_merges import BaseMerges

    latest, _ = checkpoint.latest_intact(run_dir / "checkpoints")
    if latest is not None:
        round_, state = checkpoint.load(latest, verified=True)
        merges = BaseMerges.from_state(1.0, state["merges"])
        merges.applied.clear()  # the audit's fresh platforms hold the pristine base
        return {k: np.asarray(v) for k, v in state["global_state"].items()}, merges, round_
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    if not adapter.is_file():
        raise UserError(f"audit {str(run_dir)!r}: no checkpoint and no adapter/ there; has the run finished a round?")
    from fl_llm.strategies import STRATEGIES

    strategy = STRATEGIES[cfg.strategy.name]
    if strategy.merges_into_base or not strategy.one_global_model:  # FedEx, FLoRA; FedSA, FedPer
        raise UserError(
            f"audit {str(run_dir)!r}: strategy {cfg.strategy.name} keeps part of the model outside adapter/; "
            "auditing it needs the run's checkpoints (checkpoint.every > 0)"
        )
    from safetensors.numpy import load_file

    return load_file(str(adapter)), None, 0


def _ledger_epsilon(ledger: dict | None, name: str) -> tuple[float, float]:
    """(ε, δ) one record of platform `name` enjoys under the run's DP (inf without DP)."""
    if ledger is None:
        return math.inf, 0.0
    parties = ledger["parties"]
    party = parties.get(name) or parties.get("federation")
    return record_level_guarantee(ledger["level"], float(party["epsilon"]), float(ledger["delta"]))


def audit(run_dir: str | Path, max_examples: int = 1000, progress=None) -> dict:
    """Audit every platform; writes and returns audit.json's content."""
    from fl_llm.client.platform import Platform

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"audit {str(run_dir)!r}: not a run directory (it has no config.yaml)")
    cfg = load(run_dir / "config.yaml")
    own_copy = RunDir(run_dir).init_adapter  # the run's copy of its warm start (older runs: the original)
    if own_copy.is_dir():
        cfg = replace(cfg, model=replace(cfg.model, init_adapter=str(own_copy)))
    from fl_llm.server.loop import with_state_dir

    final, merges, state_round = _final_model(run_dir, cfg)
    cfg = with_state_dir(cfg, RunDir(run_dir))  # each platform reads its own state, as in the run
    ledger_path = run_dir / "privacy.json"
    ledger = None
    if cfg.privacy.dp.level != "none" and ledger_path.is_file():
        ledger = json.loads(ledger_path.read_text(encoding="utf-8"))
    platforms = {}
    start = None  # the model before private training: the same adapter for every platform
    alpha = ALPHA / (ATTACKS * cfg.data.num_platforms)  # Bonferroni: one alarm for the whole run
    for i in range(cfg.data.num_platforms):
        plat = Platform(to_dict(cfg), i)
        if plat.user_error:
            raise UserError(plat.user_error)
        if progress:
            progress(f"auditing {plat.name}")
        if start is None:  # model.init_adapter is read once, not once per platform
            start = starting_adapter(cfg.model, plat.initial_adapter())
        eps, delta = _ledger_epsilon(ledger, plat.name)
        figures = plat.audit(
            start, final, merges.payload(i) if merges else None, state_round, max_examples, eps, delta, alpha
        )
        platforms[plat.name] = {"epsilon": eps, "delta": delta, **figures}
    result = {
        "run_dir": str(run_dir),
        "dp_level": cfg.privacy.dp.level,
        "confidence": 1 - ALPHA,
        "platforms": platforms,
        "max_auc": max(a["auc"] for p in platforms.values() for a in p["attacks"].values()),
        "bound_holds": all(a["bound_holds"] for p in platforms.values() for a in p["attacks"].values()),
        # the attacks prove, at 95% for the run, that membership leaks at all (ε > 0)
        "leak_detected": any(a["epsilon_lower_bound"] > 0 for p in platforms.values() for a in p["attacks"].values()),
    }
    write_json(run_dir / "audit.json", result)
    return result


def audit_table(result: dict) -> str:
    lines = [
        f"{'platform':<16} {'attack':<10} {'AUC':>6} {'TPR@1%':>7} {'TPR@0.1%':>9} {'ε audited':>10} {'ε':>8}  bound"
    ]
    for name, p in result["platforms"].items():
        for attack, a in p["attacks"].items():
            eps = "none" if not math.isfinite(p["epsilon"]) else f"{p['epsilon']:.2f}"
            lines.append(
                f"{name:<16} {attack:<10} {a['auc']:>6.3f} {a['tpr_at_1%_fpr']:>7.3f} {a['tpr_at_0.1%_fpr']:>9.3f} "
                f"{a['epsilon_lower_bound']:>10.2f} {eps:>8}  {'holds' if a['bound_holds'] else 'VIOLATED'}"
            )
    return "\n".join(lines)
