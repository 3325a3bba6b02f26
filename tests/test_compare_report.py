"""What `fl-llm compare` concludes from its numbers: below-local flags, the per-platform summary
over seeds, the gap-closed line. Pure functions on hand-made results, values worked out by hand."""

from __future__ import annotations

import math

import pytest

from fl_llm.compare import below_local
from fl_llm.compare_report import format_table, gap_line, platforms_over_seeds, round_line


def _run(seed: int, local: float, fed: float, central: float, personal: float, below=()):
    arms = {"local": local, "federated": fed, "centralized": central, "personalised": personal}
    detail = {a: {"shop": {"auc": v, "interval": [v - 0.01, v + 0.01]}} for a, v in arms.items()}
    modes = {
        a: {"platforms": {"shop": {"auc": v, "num_eval": 100}}, "average": {"auc": v}, "per_round": [v]}
        for a, v in arms.items()
        if a != "personalised"
    }
    return {"metric": "auc", "task": "ctr", "rounds": 1, "seeds": [seed], "partition": {}, "modes": modes,
            "detail": detail, "below_local": list(below), "federated_minus_local": fed - local}  # fmt: skip


def test_below_local_needs_the_intervals_apart():
    detail = {
        "local": {"a": {"interval": [0.70, 0.80]}, "b": {"interval": [0.70, 0.80]}},
        "federated": {"a": {"interval": [0.60, 0.69]}, "b": {"interval": [0.60, 0.71]}},
    }
    assert below_local(detail, "auc") == ["a (federated)"]


def test_per_platform_summary_pairs_the_seeds():
    runs = [_run(0, 0.70, 0.74, 0.76, 0.75), _run(1, 0.72, 0.74, 0.77, 0.73), _run(2, 0.68, 0.74, 0.75, 0.74)]
    shop = platforms_over_seeds(runs, "auc")["shop"]
    assert shop["mean"]["local"] == pytest.approx(0.70) and shop["mean"]["federated"] == pytest.approx(0.74)
    fed = shop["federated_minus_local"]  # differences 0.04, 0.02, 0.06: mean 0.04, sd 0.02, se 0.02/√3
    assert fed["mean"] == pytest.approx(0.04) and fed["se"] == pytest.approx(0.02 / math.sqrt(3))
    assert fed["below"] is False
    pers = shop["personalised_minus_local"]  # 0.05, 0.01, 0.06
    assert pers["mean"] == pytest.approx(0.04) and pers["below"] is False


def test_a_platform_that_loses_is_marked_by_the_seeds_or_by_one_seeds_intervals():
    losing = [_run(0, 0.75, 0.70, 0.76, 0.76), _run(1, 0.74, 0.70, 0.75, 0.75), _run(2, 0.76, 0.71, 0.77, 0.77)]
    assert platforms_over_seeds(losing, "auc")["shop"]["federated_minus_local"]["below"] is True
    noisy = [_run(0, 0.70, 0.74, 0.76, 0.75), _run(1, 0.72, 0.60, 0.77, 0.73, below=["shop (federated)"])]
    noisy.append(_run(2, 0.68, 0.80, 0.75, 0.74))
    entry = platforms_over_seeds(noisy, "auc")["shop"]["federated_minus_local"]
    assert entry["below"] is True and entry["seeds_below_by_intervals"] == [1]


def test_the_seeds_table_prints_the_platform_lines():
    from fl_llm.compare_report import over_seeds

    runs = [_run(0, 0.75, 0.70, 0.76, 0.76), _run(1, 0.74, 0.70, 0.75, 0.75), _run(2, 0.76, 0.71, 0.77, 0.77)]
    table = format_table(over_seeds(runs))
    line = next(x for x in table.splitlines() if x.startswith("shop"))
    assert "-0.0467" in line and "BELOW" in line


def test_the_seeds_table_has_no_personalised_column_when_no_seed_has_that_arm():
    """A FedSA or FedPer comparison: its federated models are per platform already, so there is no
    personalised arm — no column of nan for it."""
    from fl_llm.compare_report import over_seeds

    runs = [_run(s, 0.75, 0.70, 0.76, 0.76) for s in range(2)]
    for r in runs:
        del r["detail"]["personalised"]
    table = format_table(over_seeds(runs))
    assert "nan" not in table and "personal" not in table
    assert table.splitlines()[0].split() == ["seed", "local-only", "federated", "centralized", "(auc)"]


def test_gap_line_states_its_noise_or_why_there_is_no_share():
    assert gap_line(0.70, 0.75, 0.80, 0.02, "x").startswith("federated closes 50% (±10%)")
    none = gap_line(0.70, 0.75, 0.69, 0.02, "x")  # pooling did not help: no ratio, not "-500%"
    assert "no gap to close" in none and "%" not in none.split("(")[0]
    assert "no gap to close" in gap_line(0.70, 0.75, 0.71, 0.02, "x")  # a gap inside the noise


def test_per_skill_figures_over_seeds():
    """The instruction task's per-tag figures: each arm's mean and sd over seeds per platform, and
    federated minus local-only paired by seed."""
    from fl_llm.compare_report import _tag_lines, tags_over_seeds

    runs = []
    for local, fed, own in ((0.2, 0.5, 0.3), (0.4, 0.5, 0.7), (0.3, 0.8, 0.5)):
        detail = {
            a: {"shop": {"exact_match/shared": v, "exact_match": v}}
            for a, v in (("local", local), ("federated", fed), ("centralized", 0.9), ("personalised", own))
        }
        runs.append({"detail": detail})
    tags = tags_over_seeds(runs)
    assert list(tags) == ["exact_match/shared"]
    e = tags["exact_match/shared"]["shop"]
    assert e["local"][0] == pytest.approx(0.3) and e["local"][1] == pytest.approx(0.1)
    assert e["federated"][0] == pytest.approx(0.6)
    # paired differences 0.3, 0.1, 0.5: mean 0.3, sd 0.2
    assert e["federated_minus_local"] == pytest.approx([0.3, 0.2])
    # personalised: differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1
    assert e["personalised_minus_local"] == pytest.approx([0.2, 0.1])
    lines = _tag_lines({"tags": tags})
    assert lines[0].startswith("exact_match/shared") and "personalised - local" in lines[0]
    assert "+0.300 ± 0.200" in lines[1] and "+0.200 ± 0.100" in lines[1]
    one = _tag_lines({"tags": tags_over_seeds(runs[:1])})  # one seed: no spread to print, no "±nan"
    assert "nan" not in "\n".join(one)
    assert one[1].split()[1:] == ["0.200", "0.500", "0.900", "0.300", "+0.300", "+0.100"]
    for r in runs:  # a strategy that merges into the base (FedEx, FLoRA): no detail of it, no tag table
        del r["detail"]["federated"]
    assert tags_over_seeds(runs) == {}


def test_the_personal_rounds_settings_are_the_configs_unless_the_command_line_gives_them():
    """compare's personalised arm and `fl-llm personalise` read personalise.schedule/anchor from the
    config (fresh, no anchor by default); a flag given on the command line wins, 0 included; the
    section is what happens after a run, so a resumed run or comparison may change it."""
    from fl_llm.config import WHERE_NOT_WHAT, key_in, load
    from fl_llm.personalise import settings
    from tests.conftest import REPO

    assert settings(load(None, [])) == ("fresh", 0.0)
    cfg = load(None, ["personalise.schedule=continue", "personalise.anchor=0.2"])
    assert settings(cfg) == ("continue", 0.2)
    assert settings(cfg, "fresh", 0.0) == ("fresh", 0.0) and settings(cfg, None, 0.0) == ("continue", 0.0)
    assert key_in("personalise.schedule", WHERE_NOT_WHAT) and key_in("personalise.anchor", WHERE_NOT_WHAT)
    # the instruction config personalises at the schedule's final rate (docs/instruction.md says why)
    assert settings(load(str(REPO / "configs" / "synthetic_instruction.yaml"), [])) == ("continue", 0.0)


def test_personalised_rounds_continue_past_the_schedule_at_its_final_rate():
    """--personal-schedule continue: the personalised rounds are R+1..R+P, whose learning rate is
    the schedule's last (lr/10 under cosine); fresh: rounds 1..P, at the peak rate."""
    import numpy as np

    from fl_llm.client.train import scheduled_lr
    from fl_llm.config import load
    from fl_llm.personalise import personalise
    from fl_llm.progress import Progress
    from fl_llm.server.backends import Collected

    asked = []

    class Backend:
        def call_each(self, args, method, timeout_s):
            asked.extend(rnd for _, rnd in args.values())
            return Collected(results={i: {"update": {"k": np.ones(2)}} for i in args})

        def call(self, ids, method, *args, timeout_s):
            return Collected(results={i: True for i in ids})

    cfg = load(None, ["server.rounds=10", "data.num_platforms=2", "data.synthetic.train_examples=[50]"])
    got = personalise(cfg, Backend(), {"k": np.zeros(2)}, 3, "continue", Progress(enabled=False))
    assert asked == [11, 11, 12, 12, 13, 13] and got[0]["k"].tolist() == [3.0, 3.0]
    assert scheduled_lr(0.01, "cosine", 11, 10) == pytest.approx(0.001)
    asked.clear()
    personalise(cfg, Backend(), {"k": np.zeros(2)}, 2, "fresh", Progress(enabled=False))
    assert asked == [1, 1, 2, 2] and scheduled_lr(0.01, "cosine", 1, 10) == pytest.approx(0.01)


def test_an_anchor_pulls_each_step_toward_that_fixed_adapter():
    """Ditto's personal objective: with `anchor` a, one SGD step is v − η(∇L + μ(v − a)); two
    anchors a₁, a₂ from the same start end η·μ·(a₁ − a₂) apart, and an anchor equal to the start
    is FedProx's term exactly."""
    import numpy as np
    import torch

    from fl_llm.client.train import local_train
    from fl_llm.config import load
    from fl_llm.data import sources
    from fl_llm.data.batching import encode
    from fl_llm.model.adapters import apply_lora, get_adapter_state, set_adapter_state
    from fl_llm.model.build import build_base

    cfg = load(None, ["data.synthetic.train_examples=[32,32,32]", "model.lora.dropout=0.0"])
    base, tok = build_base(cfg.model, cfg.seed, num_labels=2)
    model = apply_lora(base, cfg.model, cfg.seed)
    enc = encode(sources.load_platform_data(cfg, 0).train, sources.task_of(cfg), tok, cfg.model.max_length)
    init = get_adapter_state(model)
    start = {k: v + 0.01 * (np.arange(v.size).reshape(v.shape) % 7) for k, v in init.items()}  # B not zero
    far = {k: v - 0.5 for k, v in start.items()}
    mu, lr = 2.0, 0.1

    def one_sgd_step(anchor):  # plain SGD, no clipping or decay, the same batch
        set_adapter_state(model, start)
        settings = dict(steps=1, batch_size=8, lr=lr, optimizer="sgd", weight_decay=0.0, max_grad_norm=0.0)
        rng, cpu, pad = np.random.default_rng(0), torch.device("cpu"), tok.pad_token_id
        local_train(model, enc, **settings, rng=rng, device=cpu, pad_id=pad, prox_mu=mu, anchor=anchor)
        return get_adapter_state(model)

    near_start, toward_far = one_sgd_step(start), one_sgd_step(far)
    for k in start:
        np.testing.assert_allclose(near_start[k] - toward_far[k], lr * mu * (start[k] - far[k]), rtol=1e-4, atol=1e-6)
    fedprox = one_sgd_step(None)  # FedProx: the anchor is where the step starts
    assert all(np.array_equal(fedprox[k], near_start[k]) for k in start)


def test_anchored_personalisation_sends_the_federated_model_as_the_anchor_every_round():
    """--anchor μ: every local round's anchor is the federated model itself — not the round's
    starting point, which moves — with that μ; without it, no anchor is sent."""
    import numpy as np

    from fl_llm.config import load
    from fl_llm.personalise import personalise
    from fl_llm.progress import Progress
    from fl_llm.server.backends import Collected

    sent = []

    class Backend:
        def call_each(self, args, method, timeout_s):
            sent.extend((a[0]["k"].tolist(), a[7] if len(a) > 2 else None) for a in args.values())
            return Collected(results={i: {"update": {"k": np.ones(2)}} for i in args})

        def call(self, ids, method, *args, timeout_s):
            return Collected(results={i: True for i in ids})

    cfg = load(None, ["server.rounds=10", "data.num_platforms=2", "data.synthetic.train_examples=[50]"])
    federated = {"k": np.array([5.0, -1.0])}
    got = personalise(cfg, Backend(), federated, 3, "fresh", Progress(enabled=False), anchor=0.5)
    assert [start for start, _ in sent] == [[5.0, -1.0]] * 2 + [[6.0, 0.0]] * 2 + [[7.0, 1.0]] * 2
    assert all(a["mu"] == 0.5 and a["state"]["k"].tolist() == [5.0, -1.0] for _, a in sent)
    assert got[1]["k"].tolist() == [8.0, 2.0]
    sent.clear()
    personalise(cfg, Backend(), federated, 1, "fresh", Progress(enabled=False))
    assert [a for _, a in sent] == [None, None]


def _font_with(tmp_path, chars: str, family: str):
    """A TrueType font whose only glyphs (plain squares) are `chars`, built with fontTools."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def square():
        pen = TTGlyphPen(None)
        pen.moveTo((100, 0)), pen.lineTo((100, 700)), pen.lineTo((900, 700)), pen.lineTo((900, 0)), pen.closePath()
        return pen.glyph()

    names = [".notdef", *(f"g{ord(c):x}" for c in chars)]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"g{ord(c):x}" for c in chars})
    fb.setupGlyf({n: square() for n in names})
    fb.setupHorizontalMetrics({n: (1000, 100) for n in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": family, "styleName": "Regular"})
    fb.setupOS2(), fb.setupPost()
    path = tmp_path / f"{family}.ttf"
    fb.save(str(path))
    return path


def _reliability_detail(names):
    bins = [{"mean_probability": 0.2, "positive_rate": 0.25}, {"mean_probability": 0.8, "positive_rate": 0.7}]
    return {"local": {n: {"reliability": bins, "ece": 0.05} for n in names}}


def test_a_name_no_font_draws_gets_a_numbered_panel_and_one_warning(tmp_path, monkeypatch):
    import warnings

    from matplotlib import font_manager

    from fl_llm.plots import plot_reliability

    # only fonts without Chinese characters installed (the default font among them)
    latin = [e for e in font_manager.fontManager.ttflist if e.name.startswith("DejaVu")]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", latin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        note = plot_reliability(_reliability_detail(["书籍", "shop-b"]), tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert note is not None and "书籍" in note and "shop-b" not in note.split(", so")[0]
    assert "1 shop-b, 2 书籍" in note  # the panels in order, so the numbered one can be told
    assert not [w for w in caught if "Glyph" in str(w.message)]  # not one matplotlib warning per character
    assert plot_reliability(_reliability_detail(["shop-a", "shop-b"]), tmp_path / "latin.png") is None


def test_a_font_that_has_the_characters_is_put_after_the_default(tmp_path, monkeypatch):
    import warnings

    from matplotlib import font_manager

    from fl_llm.plots import fonts_that_draw, plot_reliability

    path = _font_with(tmp_path, "书籍蒙", "Test Han")
    entry = font_manager.FontEntry(fname=str(path), name="Test Han")
    latin = [e for e in font_manager.fontManager.ttflist if e.name.startswith("DejaVu")]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", [*latin, entry])
    rc, undrawn = fonts_that_draw(["书籍", "蒙牛"])
    assert rc["font.family"][1:] == ["Test Han"] and undrawn == {"蒙牛"}  # 牛 is in no font
    assert fonts_that_draw(["书籍", "shop"])[1] == set()
    assert fonts_that_draw(["shop"]) == ({}, set())  # the default draws it: nothing changed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plot_reliability(_reliability_detail(["书籍"]), tmp_path / "r.png") is None
    assert not [str(w.message) for w in caught if "Glyph" in str(w.message)]


def test_the_round_line_weights_by_held_out_size_and_shows_a_dash_for_what_was_not_measured():
    """A round without generated answers has no exact match: "-", never "nan"; the loss is there."""
    now = {
        "local": {"a": {"eval_loss": 1.0, "exact_match": 0.2, "num_eval": 300}, "b": {"eval_loss": 2.0, "exact_match": 0.6, "num_eval": 100}},
        "centralized": {"a": {"eval_loss": 1.5, "num_eval": 300}, "b": {"eval_loss": 1.5, "exact_match": float("nan"), "num_eval": 100}},
    }  # fmt: skip
    line = round_line(now, "exact_match")
    assert line == "loss/exact_match: local 1.250/0.300  centralized 1.500/  -  "
    assert "nan" not in line
