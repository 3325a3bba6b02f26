"""Experiment tracking beyond metrics.jsonl (which is always written): MLflow and TensorBoard.

    tracking.mlflow=true        one MLflow run per fl_llm run, in a local file store (./mlruns)
                                or tracking.mlflow_uri; params = the flattened config; metrics per
                                round (step = round): global and per-platform loss and task
                                metrics, ε, bytes, round seconds; artifacts at the end:
                                config.yaml, privacy.json (the ledger), summary.json, adapter/
    tracking.tensorboard=true   event files in RUN_DIR/tensorboard (same scalars)

`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri ./mlruns` (MLflow 3 asks for that
opt-in to read a file store; or point tracking.mlflow_uri at a server or database) — or
`tensorboard --logdir RUN_DIR/tensorboard` — then shows the run's metrics per round. A resumed run continues the same MLflow run (its id is kept
in RUN_DIR/tracking.json).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fl_llm.config import RunConfig
from fl_llm.errors import UserError

SCALARS = ("eval_loss", "train_loss", "epsilon", "bytes_up", "bytes_down", "aggregation_error")


def round_scalars(record: dict, primary: str) -> dict[str, float]:
    """The numbers of one round record worth a chart: global, then platform/<name>/<key>."""
    out = {}
    for key in (*SCALARS, primary):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    if "seconds" in record:
        out["round_seconds"] = float(record["seconds"].get("round", 0.0))
    for name, p in record.get("platforms", {}).items():
        for key in ("eval_loss", primary, "train_loss", "epsilon"):
            value = p.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"platform/{name}/{key}"] = float(value)
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # MLflow caps a param's value
    return out


class Trackers:
    """Whichever of MLflow and TensorBoard the config asks for; no-ops otherwise."""

    def __init__(self, cfg: RunConfig, run_dir: Path, primary: str, resume: bool):
        self.primary, self.run_dir = primary, Path(run_dir)
        self.mlflow = self.writer = None
        t = cfg.tracking
        if t.mlflow:
            self._start_mlflow(cfg, resume)
        if t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "tracking.tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _start_mlflow(self, cfg: RunConfig, resume: bool) -> None:
        try:
            import mlflow
        except ImportError:
            raise UserError(
                "tracking.mlflow=true needs MLflow: pip install mlflow (or mlflow-skinny without the UI)"
            ) from None
        t = cfg.tracking
        uri = t.mlflow_uri or (Path.cwd() / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store behind an opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(t.mlflow_experiment)
        state = self.run_dir / "tracking.json"
        run_id = json.loads(state.read_text()).get("mlflow_run_id") if resume and state.exists() else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_dir.name)
        if run_id is None:
            from fl_llm.config import to_dict

            params = _flat(to_dict(cfg))
            keys = sorted(params)
            for start in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params({k: params[k] for k in keys[start : start + 100]})
            mlflow.set_tags({"fl_llm.run_dir": str(self.run_dir.resolve()), "fl_llm.task": cfg.data.task})
        state.write_text(json.dumps({"mlflow_run_id": run.info.run_id, "mlflow_uri": uri}) + "\n")
        self.mlflow = mlflow

    def round(self, record: dict) -> None:
        scalars = round_scalars(record, self.primary)
        if self.mlflow:
            self.mlflow.log_metrics(scalars, step=int(record["round"]))
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, global_step=int(record["round"]))
            self.writer.flush()

    def finish(self, status: str) -> None:
        if self.writer:
            self.writer.close()
        if not self.mlflow:
            return
        for name in ("config.yaml", "summary.json", "privacy.json", "platforms.json"):
            if (self.run_dir / name).exists():
                self.mlflow.log_artifact(str(self.run_dir / name))
        if (self.run_dir / "adapter").is_dir():
            self.mlflow.log_artifacts(str(self.run_dir / "adapter"), artifact_path="adapter")
        self.mlflow.end_run(status={"completed": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))
