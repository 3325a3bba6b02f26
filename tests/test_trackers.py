"""MLflow and TensorBoard tracking: a run's metrics per round, its params and artifacts land
where `mlflow ui` and `tensorboard` read them; a resumed run continues the same MLflow run."""

from __future__ import annotations

import pytest

from tests.conftest import SMALL


def test_mlflow_and_tensorboard_get_every_round(tmp_path):
    from mlflow.tracking import MlflowClient

    from fl_llm.config import load
    from fl_llm.server.loop import run
    from fl_llm.tracking import read_metrics

    uri = (tmp_path / "mlruns").resolve().as_uri()
    overrides = [
        *SMALL,
        "backend=local",
        "tracking.mlflow=true",
        f"tracking.mlflow_uri={uri}",
        "tracking.mlflow_experiment=test",
        "tracking.tensorboard=true",
        "privacy.dp.level=client",
        "privacy.dp.noise_multiplier=0.01",
        "privacy.dp.secure_rng=false",
    ]
    run(load(None, overrides), tmp_path / "r")
    rows = read_metrics(tmp_path / "r")
    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert found.info.status == "FINISHED" and found.data.params["server.rounds"] == "2"
    history = client.get_metric_history(found.info.run_id, "auc")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([r["auc"] for r in rows])
    assert len(client.get_metric_history(found.info.run_id, "platform/gadget-hub/eval_loss")) == 2
    assert len(client.get_metric_history(found.info.run_id, "epsilon")) == 2
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.yaml", "summary.json", "privacy.json", "adapter"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(found.info.run_id, "adapter")}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_loss")] == [1, 2]

    # a resumed run logs its further rounds into the same MLflow run
    run(load(tmp_path / "r" / "config.yaml", ["server.rounds=3"]), tmp_path / "r", resume=True)
    (again,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert again.info.run_id == found.info.run_id
    assert [m.step for m in client.get_metric_history(found.info.run_id, "auc")] == [1, 2, 3]


def test_a_large_federation_gets_a_short_round_line():
    from fl_llm.progress import platforms_summary

    many = {f"shop-{i}": {"eval_loss": 1.0, "auc": 0.5 + i / 100} for i in range(100)}
    assert platforms_summary(many, "auc") == "100 platforms, auc min 0.50 median 0.99 max 1.49"
    few = {"a": {"eval_loss": 1.234, "auc": 0.5}, "b": {"eval_loss": 0.9, "auc": None}}
    assert platforms_summary(few, "auc") == "a 1.23/0.50  b 0.90/  -  "
