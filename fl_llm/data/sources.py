"""Where a platform's records come from. Called inside that platform's own process only.

Two sources:
- `synthetic`: the seeded e-commerce world (`data/synthetic.py`, and `data/instructions.py` for
  the shop assistant's conversations), any of the tasks;
- `files`: your own JSONL / JSON / CSV (also .gz) / Parquet files read with `datasets`, or Excel
  workbooks (.xlsx, one sheet) read with pandas — one file per platform, or one file split by a
  column, or pooled files re-split by a partitioner.

Held-out rows: `data.files.eval_paths` when given; otherwise `data.files.eval_fraction` of each
platform's rows, drawn at random from a generator seeded by (seed, platform). `max_rows` keeps a
random sample (same generator) of at most that many training rows, and of at most
max_rows · eval_fraction / (1 − eval_fraction) held-out rows — never the first rows of a file,
which for a file sorted by label would be one class.

Every problem with a file (missing, empty, unreadable row, missing column, bad label) is a
`UserError` naming the file, and the row and column where there is one.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_llm.config import RunConfig
from fl_llm.data import partition, synthetic
from fl_llm.data.instructions import instruction_records
from fl_llm.data.tasks import Task, resolve_task
from fl_llm.errors import UserError


@dataclass
class PlatformData:
    name: str
    train: list[dict]
    eval: list[dict]


def task_of(cfg: RunConfig) -> Task:
    return resolve_task(cfg.data.task, cfg.data.template, cfg.data.verbalizer or None)


POOLED = -1  # every platform's data in one place: the centralized upper bound of `fl-llm compare`


def world_seed(cfg: RunConfig) -> int:
    """The synthetic world's seed: data.synthetic.world_seed, or the run seed."""
    ws = cfg.data.synthetic.world_seed
    return cfg.seed if ws is None else ws


def load_platform_data(cfg: RunConfig, platform: int) -> PlatformData:
    """The train and held-out records of one platform (all of them pooled for `POOLED`)."""
    if platform == POOLED:
        parts = [load_platform_data(cfg, p) for p in range(cfg.data.num_platforms)]
        return PlatformData("pooled", [r for d in parts for r in d.train], [r for d in parts for r in d.eval])
    if cfg.data.source == "synthetic":
        return _synthetic(cfg, platform)
    return _files(cfg, platform)


# --- synthetic --------------------------------------------------------------------------------


def _generate(cfg: RunConfig, world, p: int, n: int, split: str) -> list[dict]:
    syn = cfg.data.synthetic
    task = cfg.data.task
    if task == "recommendation":
        return synthetic.recommendation_records(
            world, p, n, liked=syn.history_liked, disliked=syn.history_disliked, split=split
        )
    generators = {
        "ctr": synthetic.ctr_records,
        "fraud": synthetic.fraud_records,
        "review": synthetic.review_records,
        "instruction": instruction_records,
    }
    return generators[task](world, p, n, split=split)


def _synthetic(cfg: RunConfig, platform: int) -> PlatformData:
    n = cfg.data.num_platforms
    sizes = cfg.data.synthetic.train_examples
    sizes = sizes * n if len(sizes) == 1 else sizes
    world = synthetic.make_world(world_seed(cfg), n)
    if cfg.data.partition.method == "natural":
        return PlatformData(
            world.platform_names[platform],
            _generate(cfg, world, platform, sizes[platform], "train"),
            _generate(cfg, world, platform, cfg.data.synthetic.eval_examples, "eval"),
        )
    # Re-split the pooled world: every process builds the same pool and keeps its share.
    train = [r for p in range(n) for r in _generate(cfg, world, p, sizes[p], "train")]
    held = [r for p in range(n) for r in _generate(cfg, world, p, cfg.data.synthetic.eval_examples, "eval")]
    mine_train, mine_eval = _repartition(cfg, train, held, "synthetic data")
    return PlatformData(f"platform-{platform}", mine_train[platform], mine_eval[platform])


def _repartition(cfg: RunConfig, train: list[dict], held: list[dict], what: str):
    """Split pooled train and held-out rows into platforms with the configured partitioner."""
    part, k = cfg.data.partition, cfg.data.num_platforms
    rng = np.random.default_rng([cfg.seed, 0x9A27])
    if part.method == "iid":
        a_train, a_held = partition.iid(len(train), k, rng), partition.iid(len(held), k, rng)
    elif part.method == "size_skew":
        a_train = partition.size_skew(len(train), k, part.alpha, rng, part.min_size)
        a_held = partition.iid(len(held), k, rng)  # every platform is evaluated on the same mix
    else:  # dirichlet: held-out rows follow each platform's own skew
        key_field = part.by  # "label" is the mapped label of every record
        if any(key_field not in r for r in train[:1]):
            raise UserError(f"config key 'data.partition.by': {what} has no field {part.by!r}")
        codes = {v: i for i, v in enumerate(sorted({str(r.get(key_field)) for r in train + held}))}
        keys_train = np.array([codes[str(r.get(key_field))] for r in train])
        keys_held = np.array([codes[str(r.get(key_field))] for r in held])
        try:
            a_train, props = partition.dirichlet(keys_train, k, part.alpha, rng, part.min_size)
        except ValueError as e:
            raise UserError(f"data.partition: {e}") from None
        a_held = partition.assign_by_proportions(keys_held, props, rng)
    if part.method != "dirichlet" and min(np.bincount(a_train, minlength=k)) < part.min_size:
        raise UserError(f"data.partition: some platform gets fewer than {part.min_size} training rows")
    return (
        [[r for r, a in zip(train, a_train) if a == i] for i in range(k)],
        [[r for r, a in zip(held, a_held) if a == i] for i in range(k)],
    )


# --- files ------------------------------------------------------------------------------------

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".xlsx": "excel"}
# what a file of each kind starts with (a text format: not one of the binary ones)
_MAGIC = {
    b"\x1f\x8b": "a gzip file",
    b"PAR1": "a Parquet file",
    b"PK\x03\x04": "a zip archive (e.g. an Excel workbook)",
}


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise UserError(
            f"data file {str(path)!r}: unknown format; use .jsonl, .json, .csv, .tsv, .parquet (optionally .gz) "
            "or .xlsx"
        )
    return fmt


def _check_content(path: Path, fmt: str) -> None:
    """A file whose first bytes say it is something its name does not (a gzip named .csv, a CSV
    named .parquet, an Excel workbook named .csv): one line saying what it looks like."""
    with open(path, "rb") as f:
        head = f.read(4)
    looks = next((what for magic, what in _MAGIC.items() if head.startswith(magic)), "a text file")
    compressed = path.suffix.lower() in (".gz", ".bz2", ".xz", ".zst")
    expected = (
        "a gzip file"
        if compressed and path.suffix.lower() == ".gz"
        else {"parquet": "a Parquet file", "excel": "a zip archive (e.g. an Excel workbook)"}.get(fmt, "a text file")
    )
    if compressed and path.suffix.lower() != ".gz":
        return  # other compressions: left to the reader
    if looks != expected:
        raise UserError(
            f"data file {str(path)!r}: its name says {expected.replace('a text file', fmt + ' text')}, but its "
            f"content looks like {looks}; rename it to match what it holds"
        )


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _locate_bad_row(path: Path, fmt: str) -> str:
    """Find the first row that does not parse, for a message a person can act on."""
    try:
        with _open_text(path) as f:
            if fmt == "json":
                text = f.read()
                if text.lstrip().startswith("["):
                    try:
                        json.loads(text)
                    except json.JSONDecodeError as e:
                        return f"line {e.lineno}: {e.msg}"
                    return ""
                for i, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except json.JSONDecodeError as e:
                            return f"row {i}: not valid JSON ({e.msg})"
            elif fmt == "csv":
                delim = "\t" if ".tsv" in path.name else ","
                reader = csv.reader(f, delimiter=delim)
                header = next(reader, [])
                for i, row in enumerate(reader, 1):
                    if len(row) != len(header):
                        return f"row {i}: {len(row)} fields where the header has {len(header)}"
    except UnicodeDecodeError as e:
        return f"byte {e.start}: not UTF-8 text"
    except (OSError, EOFError, zlib.error) as e:  # a damaged .gz: "not a gzip file", a bad CRC, cut short
        return f"the compressed file is damaged ({e})"
    return ""


def _read_excel(path: Path, sheet: str | None) -> list[dict]:
    """Rows of one sheet of an Excel workbook (the first sheet unless `sheet` names one)."""
    import pandas as pd

    try:
        book = pd.ExcelFile(path, engine="openpyxl")
    except Exception as e:  # noqa: BLE001 - a damaged workbook raises many kinds
        raise UserError(f"data file {str(path)!r} cannot be read as an Excel workbook: {e}") from None
    if sheet is not None and sheet not in book.sheet_names:
        raise UserError(
            f"config key 'data.files.sheet': {str(path)!r} has no sheet {sheet!r} (its sheets: "
            f"{', '.join(book.sheet_names)})"
        )
    frame = book.parse(sheet if sheet is not None else book.sheet_names[0])
    if frame.empty:
        raise UserError(f"data file {str(path)!r} has no rows" + (f" in sheet {sheet!r}" if sheet else ""))
    frame.columns = [str(c) for c in frame.columns]
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def read_table(path: str | Path, sheet: str | None = None) -> list[dict]:
    """All rows of one file as dicts, through `datasets` (Excel: pandas); user errors name the
    file and row."""
    import datasets

    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"data file {str(path)!r} is a directory; give the file itself (one per platform)")
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"data file {str(path)!r} is empty")
    fmt = _format(path)
    _check_content(path, fmt)
    if fmt == "excel":
        return _read_excel(path, sheet)
    kwargs = {"delimiter": "\t"} if fmt == "csv" and ".tsv" in path.name else {}
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parser errors are reported below, once
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as e:  # datasets wraps parser errors in several exception types
        where = _locate_bad_row(path, fmt)
        detail = where or str(e).splitlines()[0][:300]
        raise UserError(f"data file {str(path)!r} cannot be read as {fmt}: {detail}") from None
    if len(ds) == 0:
        raise UserError(f"data file {str(path)!r} has no rows")
    return ds.to_list()


def _to_records(rows: list[dict], cfg: RunConfig, task: Task, path: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """Rename columns to template fields, check every needed value, map labels to indices."""
    if task.generative:
        from fl_llm.data.chat import conversation_records

        return conversation_records(rows, cfg.data.files.columns, path, extra)
    f = cfg.data.files
    fields = task.fields()
    column_of = {field: f.columns.get(field, field) for field in fields}
    needed = {**column_of, "label": f.label_column, **{c: c for c in extra}}
    available = list(rows[0].keys())
    for field, col in needed.items():
        if col not in rows[0]:
            what = "label column" if field == "label" else f"template field {{{field}}}"
            raise UserError(
                f"data file {path!r}: no column {col!r} (the {what}); its columns are {', '.join(available)}"
            )
    label_of = {str(v): i for i, v in enumerate(f.label_values)}
    n_labels = len(task.verbalizer)
    out = []
    for i, row in enumerate(rows, 1):
        rec = {}
        for field, col in needed.items():
            value = row.get(col)
            if value is None or (isinstance(value, float) and value != value):
                if f.drop_missing:
                    break
                raise UserError(
                    f"data file {path!r}, row {i}, column {col!r}: value is missing "
                    "(fix the file, or set data.files.drop_missing=true to skip such rows)"
                )
            rec[field] = value
        if len(rec) < len(needed):
            continue
        raw = rec["label"]
        if label_of:
            label = label_of.get(str(raw).strip())
        else:
            try:
                label = int(float(raw))
            except (TypeError, ValueError):
                label = None
        if label is None or not 0 <= label < n_labels:
            allowed = f.label_values or list(range(n_labels))
            raise UserError(
                f"data file {path!r}, row {i}, column {f.label_column!r}: label {raw!r} is not one of {allowed} "
                "(set data.files.label_values)"
            )
        rec["label"] = label
        out.append(rec)
    return out


def _holdout(rows: list[dict], fraction: float, rng) -> tuple[list[dict], list[dict]]:
    order = rng.permutation(len(rows))
    n_eval = max(1, int(round(fraction * len(rows)))) if len(rows) > 1 else 0
    held = set(order[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _files(cfg: RunConfig, platform: int) -> PlatformData:
    f, task, k = cfg.data.files, task_of(cfg), cfg.data.num_platforms
    rng = np.random.default_rng([cfg.seed, 0xF11E, platform])
    extra = (f.split_by,) if f.split_by else ()
    if cfg.data.partition.method != "natural" and cfg.data.partition.by != "label":
        extra += (cfg.data.partition.by,)

    def load(path):
        return _to_records(read_table(path, f.sheet), cfg, task, path, extra)

    if cfg.data.partition.method == "natural" and not f.split_by:
        # One file per platform: read only this platform's own file.
        train = load(f.paths[platform])
        held = load(f.eval_paths[platform]) if f.eval_paths else None
        if held is None:
            train, held = _holdout(train, f.eval_fraction, rng)
        name = Path(f.paths[platform]).name.split(".")[0]
        return _capped(name, train, held, f, rng)

    rows = [r for p in f.paths for r in load(p)]
    held_rows = [r for p in f.eval_paths for r in load(p)] if f.eval_paths else None
    if f.split_by:
        assign, values = partition.natural([str(r[f.split_by]) for r in rows], [str(v) for v in f.split_values] or None)
        if len(values) != k:
            raise UserError(
                f"data.files.split_by {f.split_by!r} has {len(values)} values ({', '.join(values[:12])}) "
                f"but data.num_platforms is {k}; set data.num_platforms or data.files.split_values"
            )
        mine = [r for r, a in zip(rows, assign) if a == platform]
        if not mine:
            raise UserError(f"data.files.split_by {f.split_by!r}: no rows have value {values[platform]!r}")
        if held_rows is not None:
            h_assign, _ = partition.natural([str(r[f.split_by]) for r in held_rows], values)
            held = [r for r, a in zip(held_rows, h_assign) if a == platform]
            train = mine
        else:
            train, held = _holdout(mine, f.eval_fraction, rng)
        return _capped(str(values[platform]), train, held, f, rng)

    if held_rows is None:
        pooled_rng = np.random.default_rng([cfg.seed, 0xF11E])
        rows, held_rows = _holdout(rows, f.eval_fraction, pooled_rng)
    trains, helds = _repartition(cfg, rows, held_rows, "the data files")
    return _capped(f"platform-{platform}", trains[platform], helds[platform], f, rng)


def _capped(name: str, train: list[dict], held: list[dict], f, rng) -> PlatformData:
    """data.files.max_rows: a random sample (seeded) of at most max_rows training rows, and of the
    held-out rows in the same proportion as eval_fraction — not a file's first rows."""
    if f.max_rows is None:
        return PlatformData(name, train, held)
    held_cap = max(1, int(np.ceil(f.max_rows * f.eval_fraction / (1 - f.eval_fraction))))

    def sample(rows: list[dict], n: int) -> list[dict]:
        if len(rows) <= n:
            return rows
        return [rows[i] for i in np.sort(rng.choice(len(rows), size=n, replace=False))]

    return PlatformData(name, sample(train, f.max_rows), sample(held, held_cap))
