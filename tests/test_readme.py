"""The README's promises, checked: its bring-your-own-data example runs as written."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import yaml

from tests.conftest import REPO


def _readme_yaml_after(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_bring_your_own_data_example_runs_as_written(tmp_path):
    """A newcomer copies the README's YAML, puts CSV files where it says, and runs it unchanged."""
    block = _readme_yaml_after("### Bring your own data")
    (tmp_path / "my-shops.yaml").write_text(block, encoding="utf-8")
    cfg = yaml.safe_load(block)
    files = cfg["data"]["files"]
    template_fields = set(re.findall(r"{(\w+)}", cfg["data"]["template"]))
    columns = [files["columns"].get(f, f) for f in sorted(template_fields)] + [files["label_column"]]
    (tmp_path / "data").mkdir()
    for s, path in enumerate(files["paths"]):
        with open(tmp_path / path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for i in range(60):
                good = (i + s) % 3 != 0
                row = {c: f"{c} {i}" for c in columns}
                row[files["columns"].get("text", "text")] = "works great, love it" if good else "broke in a week"
                row[files["label_column"]] = files["label_values"][int(good)]
                w.writerow(row)
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_llm",
            "run",
            "my-shops.yaml",
            "backend=local",
            "server.rounds=1",
            "client.local_steps=4",
            "tracking.progress=false",
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # relative paths in the config are read from where fl-llm runs
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    platforms = json.loads((out / "platforms.json").read_text())
    assert [p["name"] for p in platforms] == [p.split("/")[-1].split(".")[0] for p in files["paths"]]
    assert [p["num_train"] + p["num_eval"] for p in platforms] == [60, 60]
    assert "macro_f1" in proc.stdout
    # the example names an encoder and nothing about training: it runs on the encoder recipe
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["client"]["head_lr"] == 0.01 and saved["client"]["warmup_steps"] == 10
    assert "encoder recipe" in proc.stdout and "client.head_lr=0.01" in proc.stdout
