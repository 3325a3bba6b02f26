"""The markdown table docs/results.md shows for one `fl-llm compare --seeds N` output dir: per
platform, each arm's headline metric as the mean over seeds, and federated (and personalised)
minus local-only paired by seed with ±2 standard errors; the platform-weighted averages; the gap
closed; each seed's wall time (from its comparison.json's write time).

    python benchmarks/results_table.py runs/m-credit
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fl_llm.compare_report import PERSONAL, platforms_over_seeds


def table(out_dir: Path) -> str:
    result = json.loads((out_dir / "comparison.json").read_text())
    runs, metric = result["per_seed"], result["metric"]
    per = result.get("platforms") or platforms_over_seeds(runs, metric)
    arms = list(next(iter(per.values()))["mean"])
    titles = {"local": "local-only", "federated": "federated", "centralized": "centralized", PERSONAL: "personalised"}
    head = "| platform | " + " | ".join(titles[a] for a in arms) + " | federated − local | personalised − local |"
    lines = [head, "|" + "---|" * (len(arms) + 3)]
    for name, e in per.items():
        cells = [f"{e['mean'][a]:.3f}" for a in arms]
        diffs = []
        for a in ("federated", PERSONAL):
            d = e.get(f"{a}_minus_local")
            diffs.append(
                "—" if d is None else f"{d['mean']:+.3f} ± {2 * d['se']:.3f}" + (" **below**" if d["below"] else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells + diffs) + " |")
    m = result["modes"]
    avg = [f"{m[a]['average'][metric]:.3f}" for a in arms if a in m]
    if PERSONAL in arms:
        import numpy as np

        from fl_llm.compare_report import _mean

        avg.append(f"{np.mean([_mean(r['detail'][PERSONAL], metric) for r in runs]):.3f}")
    lines.append("| average | " + " | ".join(avg) + f" | {result['federated_minus_local']:+.3f} ± "
                 f"{2 * result['federated_minus_local_std'] / len(runs) ** 0.5:.3f} | |")  # fmt: skip
    walls = []
    for r in runs:  # recorded by compare; for older results, from the files' write times
        if "wall_s" in r:
            walls.append(f"{r['wall_s'] / 60:.1f}")
            continue
        seed_dir = out_dir / f"seed-{r['seeds'][0]}"
        start = (seed_dir / "federated" / ".fl_llm-run").stat().st_mtime
        walls.append(f"{((seed_dir / 'comparison.json').stat().st_mtime - start) / 60:.1f}")
    if any("ece" in d for r in runs for d in r["detail"]["federated"].values()):
        lines += [
            "",
            "| calibration, mean over seeds | ECE local-only | ECE federated | threshold | precision | recall |",
        ]
        lines.append("|---|---|---|---|---|---|")
        for name in per:

            def mean(arm, key, name=name):
                vals = [r["detail"][arm][name].get(key) for r in runs]
                vals = [v for v in vals if v is not None and v == v]
                return sum(vals) / len(vals) if vals else float("nan")

            lines.append(
                f"| {name} | {mean('local', 'ece'):.3f} | {mean('federated', 'ece'):.3f} | "
                f"{mean('federated', 'threshold'):.2f} | {mean('federated', 'precision@threshold'):.2f} | "
                f"{mean('federated', 'recall@threshold'):.2f} |"
            )
    lines.append("")
    lines.append(
        f"{metric}, mean over seeds {', '.join(str(s) for s in result['seeds'])}; minutes per seed: {', '.join(walls)}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
