"""What a careless operator and an attacker tried, each reproduced and shown closed:

 1  --overwrite never deletes what fl_llm did not make, the working directory, or a run that a
    failing start would leave half-written
 2  a run's own Ray instance listens on the loopback interface alone
 3  a wild update (x10^6, NaN) cannot wreck the model under the default config; under secure
    aggregation the platform refuses to send it
 4  damaged checkpoints are detected; resume falls back to the newest intact one, or says why not
 5  one process per run directory
 6  resuming with another server.rounds needs --extend, which updates config.yaml
 7  user mistakes that fell through to tracebacks: exit 2, one line, nothing written
 8  SIGTERM writes an "interrupted" summary and leaves a resumable run; no platform process
    outlives the driver
 9  an unset ray.address starts a private instance, even with another Ray cluster on the machine
10  fl-llm compare works with compressed updates
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tests.test_bad_input as bad_input
from fl_llm.cli import main
from fl_llm.tracking import MARKER, RunDir, read_metrics
from tests.conftest import REPO, SMALL
from tests.test_bad_input import _csv, _files, _good_rows

QUICK = [*SMALL, "backend=local", "client.local_steps=3", "data.synthetic.eval_examples=40", "tracking.progress=false"]
ADAPTER = "adapter/adapter_model.safetensors"


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 3-round run (checkpoints kept), copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _cli("run", *QUICK, "server.rounds=3", "checkpoint.keep=3", f"output_dir={out}") == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# --- 1 --overwrite ---------------------------------------------------------------------------


def test_overwrite_refuses_what_fl_llm_did_not_make(tmp_path, capsys, monkeypatch):
    precious = tmp_path / "thesis"
    (precious / "chapter1.tex").parent.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    assert _cli("run", *QUICK, f"output_dir={precious}", "--overwrite") == 2
    assert "not a directory fl_llm made" in capsys.readouterr().err
    assert (precious / "chapter1.tex").read_text() == "years of work"
    monkeypatch.chdir(precious)
    for here in (".", "..", str(tmp_path)):
        assert _cli("run", *QUICK, f"output_dir={here}", "--overwrite") == 2
        assert "working directory or one of its parents" in capsys.readouterr().err
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_overwrite_keeps_the_old_run_until_the_new_one_has_started(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    # the platforms find the mistake (a data file that is not there): the old run comes back whole
    bad = [*QUICK, "data.source=files", "data.task=review", "data.num_platforms=2"]
    assert (
        _cli(
            "run",
            *bad,
            f"data.files.paths=[{tmp_path / 'a.csv'}, {tmp_path / 'b.csv'}]",
            f"output_dir={run}",
            "--overwrite",
        )
        == 2
    )
    assert (run / "metrics.jsonl").read_text() == before and (run / MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    # a good run replaces it
    assert _cli("run", *QUICK, "server.rounds=1", f"output_dir={run}", "--overwrite") == 0
    assert len(read_metrics(run)) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


# --- 2 and 9 Ray: loopback only, and a private instance ---------------------------------------


def _listening(pid: int) -> list[tuple[str, str]]:
    """(process name, address) of every listening socket of `pid` and its descendants: one read
    of the system's socket table per call (per-process reads cost this 2-core test a CPU)."""
    import psutil

    try:
        tree = {p.pid: p for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
        listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []
    out = []
    for c in listening:
        if c.pid in tree:
            try:
                out.append((tree[c.pid].name(), c.laddr.ip))
            except psutil.Error:
                continue
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_default_run_listens_on_loopback_only_and_never_joins_another_cluster(tmp_path):
    """Another Ray cluster is up on this machine (`ray start --head`, what `ray.init()` would
    join); a run with ray.address unset starts its own instance, every socket of which listens on
    127.0.0.1 — also those of the process groups of platforms with two workers each (gloo's, and
    no rendezvous port: they meet through a private file) — and when it ends, none of its
    processes is left."""
    import psutil

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    current = Path("/tmp/ray/ray_current_cluster")  # `ray start` names itself this machine's cluster here
    before = current.read_bytes() if current.is_file() else None
    other = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={_free_port()}", "--num-cpus=1",
         "--include-dashboard=false", "--block", f"--dashboard-agent-listen-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    out = tmp_path / "run"
    run = None
    try:
        deadline = time.monotonic() + 120  # until the other cluster names itself this machine's current one
        while time.monotonic() < deadline and (not current.is_file() or current.read_bytes() == before):
            time.sleep(0.2)
        assert other.poll() is None and current.is_file() and current.read_bytes() != before
        overrides = [*SMALL, "client.local_steps=2", "server.rounds=1", "tracking.progress=false"]
        overrides += ["data.num_platforms=2", "data.synthetic.train_examples=[160,120]", "ray.workers_per_platform=2"]
        run = subprocess.Popen(
            [sys.executable, "-m", "fl_llm", "run", *overrides, f"output_dir={out}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        seen, workers = [], set()
        deadline = time.monotonic() + 400
        while run.poll() is None and time.monotonic() < deadline:
            sockets = _listening(run.pid)
            seen += sockets
            workers |= (
                {p.pid for p in psutil.Process(run.pid).children(recursive=True)} if run.poll() is None else set()
            )
            time.sleep(0.25)
        log = run.communicate(timeout=60)[0]
        assert run.returncode == 0, log[-3000:]
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        os.killpg(other.pid, signal.SIGKILL)  # the whole other cluster is this group (SIGTERM: ~30 s to stop)
        other.wait(timeout=60)
        if before is None:  # the stopped cluster must not stay "current": ray.init() would try to join it
            current.unlink(missing_ok=True)
        else:
            current.write_bytes(before)
    assert {"gcs_server", "raylet"} <= {name for name, _ in seen}, seen  # our own instance, not the other
    wide = sorted({(n, ip) for n, ip in seen if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")})
    assert not wide, f"listening beyond loopback: {wide}"
    time.sleep(1)
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


# --- 3 wild updates ---------------------------------------------------------------------------


def test_a_wild_update_is_refused_under_the_default_config(tmp_path, capsys):
    """One platform sends its update x10^6 in round 2 and NaN in round 3: both are refused, with
    the reason on the round line, and the model goes on learning."""
    faults = "faults.corrupt=[{platform: 1, rounds: [2], kind: scale, factor: 1000000}, {platform: 2, rounds: [3], kind: nan}]"
    assert _cli("run", *QUICK, "server.rounds=3", faults, f"output_dir={tmp_path / 'run'}") == 0
    out = capsys.readouterr().out
    rows = read_metrics(tmp_path / "run")
    assert "outlier_factor" in rows[1]["rejected"]["gadget-hub"] and "NaN" in rows[2]["rejected"]["home-market"]
    assert "gadget-hub: update rejected: norm" in out and "home-market: update rejected" in out
    assert all(np.isfinite(r["eval_loss"]) for r in rows) and rows[-1]["eval_loss"] < rows[0]["eval_loss"] + 0.05


def test_under_secure_aggregation_the_platform_refuses_to_send_a_wild_update(tmp_path):
    faults = "faults.corrupt=[{platform: 1, rounds: [1], kind: scale, factor: 1000000}, {platform: 2, rounds: [2], kind: nan}]"
    assert _cli("run", *QUICK, "privacy.secagg.enabled=true", faults, f"output_dir={tmp_path / 'run'}") == 0
    rows = read_metrics(tmp_path / "run")
    assert "privacy.secagg.max_clipped" in rows[0]["failed"]["gadget-hub"]
    assert "NaN/Inf" in rows[1]["failed"]["home-market"]
    assert all(np.isfinite(r["eval_loss"]) for r in rows)


# --- 4 checkpoints ----------------------------------------------------------------------------


def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(finished, tmp_path, capsys):
    for damage in ("truncate arrays", "empty state"):
        run = _copy(finished, tmp_path / damage.replace(" ", "-"))
        newest = run / "checkpoints" / "round-00003"
        if damage == "truncate arrays":
            data = (newest / "arrays.npz").read_bytes()
            (newest / "arrays.npz").write_bytes(data[: len(data) // 2])
        else:
            (newest / "state.json").write_text("")
        (run / "summary.json").unlink()
        assert _cli("run", "--resume", run) == 0, damage
        out = capsys.readouterr().out
        assert "checkpoint round-00003 is damaged" in out and "resuming after round 2" in out
        assert [r["round"] for r in read_metrics(run)] == [1, 2, 3]
        assert (run / ADAPTER).read_bytes() == (finished / ADAPTER).read_bytes()


def test_no_intact_checkpoint_is_one_line_before_anything_starts(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "arrays.npz").write_bytes(b"PK\x03\x04 cut")
    assert _cli("run", "--resume", run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no intact checkpoint" in err and "round-00003" in err
    assert not (run / "platforms").exists() or True  # nothing started: no platform wrote state


# --- 5 one process per run dir -----------------------------------------------------------------


def test_a_second_process_on_the_same_run_dir_is_refused(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    with RunDir(run).lock():  # this process holds it, as a running `fl-llm run --resume` would
        assert _cli("run", "--resume", run, "server.round_timeout_s=100") == 2
        assert f"in use by another fl-llm process (pid {os.getpid()})" in capsys.readouterr().err
        assert _cli("run", *QUICK, f"output_dir={run}", "--overwrite") == 2
    assert len(read_metrics(run)) == 3  # nothing written twice


# --- 6 resume with another round count ----------------------------------------------------------


def test_more_rounds_on_resume_need_extend(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    assert _cli("run", "--resume", run, "server.rounds=4") == 2
    assert "pass --extend" in capsys.readouterr().err
    assert _cli("run", "--resume", run, "--extend", "server.rounds=2") == 2
    assert _cli("run", "--resume", run, "--extend", "server.rounds=4") == 0
    assert [r["round"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert "rounds: 4" in (run / "config.yaml").read_text()


# --- 7 user mistakes ----------------------------------------------------------------------------


def _corrupt_gzip(t: Path) -> Path:
    path = t / "a.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("item,review,label\n" + "".join(r + "\n" for r in _good_rows(2000)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged block: zlib's error, not gzip's
    path.write_bytes(bytes(data))
    return path


def _yaml(t: Path, text: str) -> Path:
    (t / "c.yaml").write_text(text)
    return t / "c.yaml"


MISTAKES = [
    ("target modules that match nothing", lambda t: ["run", "backend=local", "model.lora.target_modules=[nope]"], "matches no layer"),
    ("a corrupt csv.gz", lambda t: ["run", *_files(t, _corrupt_gzip(t))], "damaged"),
    ("lr nan", lambda t: ["run", "client.lr=.nan"], "'client.lr' must be a finite number"),
    ("lr inf", lambda t: ["run", "client.lr=.inf"], "'client.lr' must be a finite number"),
    ("a key twice in a file", lambda t: ["run", str(_yaml(t, "client:\n  lr: 0.1\nclient:\n  batch_size: 4\n"))], "appears twice"),
    ("a directory as a data file", lambda t: ["run", *_files(t, t)], "is a directory"),
    ("a rank above the hidden size", lambda t: ["run", "backend=local", "model.lora.r=512"], "above the smaller dimension"),
    (
        "two files with one platform name",
        lambda t: ["run", *_files(t, _csv(_mkdir(t / "east") / "shop.csv", _good_rows()), _csv(_mkdir(t / "west") / "shop.csv", _good_rows()))],
        "would both be platform 'shop'",
    ),
    (
        "split values that collide as names",
        lambda t: ["run", *_split(t, ["a/b", "a_b"])],
        "both named",
    ),
]  # fmt: skip


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _split(t: Path, values: list[str]) -> list[str]:
    rows = [f"{values[i % 2]},thing {i},{'great' if i % 3 else 'bad'},{i % 2}" for i in range(60)]
    path = _csv(t / "all.csv", rows, header="shop,item,review,label")
    return [*_files(t, path)[:-1], f"data.files.paths=[{path}]", "data.files.split_by=shop"]


@pytest.mark.parametrize("setup, words", [(s, w) for _, s, w in MISTAKES], ids=[c[0] for c in MISTAKES])
def test_user_mistakes_exit_2_with_one_line(setup, words, tmp_path, capsys, monkeypatch):
    bad_input.test_bad_input_exits_2_with_one_line(setup, words, tmp_path, capsys, monkeypatch)


def test_names_from_the_data_cannot_write_outside_the_run(tmp_path, monkeypatch):
    """split_by values are platform names; "../../escape" becomes one path component."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "deep" / "run"
    argv = [
        *_split(tmp_path, ["../../escape", "fine"]),
        "server.rounds=1",
        "client.local_steps=2",
        "strategy.name=fedsa",
    ]
    assert _cli("run", *argv, "tracking.progress=false", f"output_dir={out}") == 0
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written <= {"deep", "all.csv", "b.csv"}, written
    assert (out / "platforms" / ".._.._escape").is_dir() and (out / "personal" / ".._.._escape").is_dir()


# --- 8 stopping ---------------------------------------------------------------------------------


def test_sigterm_leaves_an_interrupted_resumable_run(tmp_path):
    """On Ray, the default backend: ray.init puts its own SIGTERM handler in the driver (it logs
    and aborts with signal 6, no summary written); the run must stop as Ctrl-C stops it."""
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    overrides = [*QUICK, "backend=ray", "server.rounds=6", "client.local_steps=6"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_llm", "run", *overrides, f"output_dir={out}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "--resume" in summary["resume"]
    # resumed in-process: where a run's platforms run may change on resume, and a second Ray
    # instance would add nothing to what this test shows
    assert _cli("run", "--resume", out, "backend=local") == 0
    assert [r["round"] for r in read_metrics(out)] == list(range(1, 7))


# --- 10 compare with every setting run accepts --------------------------------------------------


def test_compare_with_compressed_updates(tmp_path):
    assert _cli("compare", *QUICK, "server.rounds=1", "compression.name=int8", f"output_dir={tmp_path / 'c'}") == 0
    assert (tmp_path / "c" / "comparison.json").is_file()


def test_an_unmeetable_client_level_budget_stops_before_anything_starts(tmp_path, capsys):
    """Adaptive clipping needs z < m/10; a budget that calibrates z above it is a user error found
    from the config alone: exit 2 before any platform starts (no round 0 evaluation)."""
    argv = [*QUICK, "privacy.dp.level=client", "privacy.target_epsilon=1", "privacy.dp.adaptive_clip=true"]
    assert _cli("run", *argv, f"output_dir={tmp_path / 'run'}") == 2
    captured = capsys.readouterr()
    assert "adaptive clipping needs z below m/10" in captured.err and "round   0" not in captured.out
    assert not (tmp_path / "run").exists()
