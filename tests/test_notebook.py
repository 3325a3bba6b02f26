"""notebooks/evaluate.ipynb runs top to bottom (nbclient, a real kernel) on the outputs of a
fresh run and of `fl-llm compare`, reading its run dirs from FL_LLM_RUNS (no hard-coded paths)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO, SMALL


@pytest.fixture(scope="module")
def fresh_outputs(tmp_path_factory):
    from fl_llm.compare import compare
    from fl_llm.config import load
    from fl_llm.server.loop import run

    root = tmp_path_factory.mktemp("nb")
    quick = [*SMALL, "backend=local", "client.local_steps=4"]  # what the notebook reads, not what was learnt
    run(load(None, quick), root / "run")
    compare(load(None, [*quick, "server.rounds=1"]), root / "compare")
    return root


def test_evaluate_notebook_runs_clean(fresh_outputs, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "evaluate.ipynb", as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "/tmp" not in source and "runs/default-" not in source  # no hard-coded run dir
    monkeypatch.setenv("FL_LLM_RUNS", f"{fresh_outputs / 'run'},{fresh_outputs / 'compare'}")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout"
    )
    assert "evaluated now" in outputs and "logged in the last round" in outputs
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 5  # loss/metric x2 runs, the comparison, privacy/bytes x2
