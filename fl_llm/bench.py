"""`fl-llm bench`: how fast fl_llm trains, against plain transformers + peft on the same model,
data and hardware — and what the federation costs on top. Two measurements, one JSON file:

  step        the platforms' own training step (`fl_llm.client.train.local_train`: padded, or
              packed rows with no attention across examples and the vocabulary projected only
              where an answer is; bf16 autocast on a GPU) against the loop a user would write
              (the usual one: full-sequence logits, padded batches, or examples concatenated
              into packed rows without boundaries), same model, same examples, drawn from
              the e-commerce prompt-length distribution (log-normal, mean ≈ 220 tokens)
  federation  a short federated run of the config (Ray, as configured); each round's wall time
              split into local training (the busiest worker: one platform's actor, or the sum
              of the platforms a host actor trains in turn), collect, broadcast, aggregate,
              save and evaluate; federation overhead = 1 − that local training ÷ round wall
              time without evaluation, averaged after the first (warm-up) round

Useful tokens are non-pad tokens. MFU = 4·N·tokens/s ÷ peak FLOP/s (N base parameters: forward
plus activation gradients, no weight gradients for frozen weights), reported when the peak is
known (--peak-tflops, or 790 TFLOP/s bf16 on an H100/H200 as measured for the baseline).
"""

from __future__ import annotations

import json
import platform as host
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fl_llm.client.train import peak_memory, resolve_device
from fl_llm.data.batching import Encoded

# Llama shapes: the built-in model at these sizes, with random weights (model.tiny.*)
SHAPES = {
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 256},
    "1b": {
        "hidden_size": 2048,
        "num_layers": 22,
        "num_heads": 32,
        "num_kv_heads": 4,
        "intermediate_size": 5632,
        "vocab_size": 32000,
    },
    "8b": {
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
    },
}
# the plain loop's packed batch: this many rows of 2048 tokens per step (a GPU's worth at that shape)
BASELINE_ROWS = {"tiny": 0, "1b": 8, "8b": 2}
VARIANTS = ("baseline_packed", "baseline_padded", "fl_llm_packed", "fl_llm_padded")
KNOWN_PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}  # dense bf16, measured with a matmul benchmark on the device


def shape_overrides(shape: str, max_length: int) -> list[str]:
    return [f"model.tiny.{k}={v}" for k, v in SHAPES[shape].items()] + [
        f"model.tiny.max_positions={max(max_length, 512)}",
        f"model.max_length={max_length}",
    ]


def ecommerce_lengths(n: int, rng: np.random.Generator, cap: int) -> np.ndarray:
    """Prompt lengths of e-commerce examples: log-normal(5.2, 0.6), mean ≈ 220, within [16, cap]."""
    return np.clip(rng.lognormal(5.2, 0.6, n), 16, cap).astype(np.int64)


def bench_examples(n: int, vocab: int, max_length: int, seed: int = 0) -> Encoded:
    """n examples of random tokens at e-commerce lengths, the last token of each the answer."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(10, vocab, size=int(k), dtype=np.int64) for k in ecommerce_lengths(n, rng, max_length)]
    return Encoded(rows, np.ones(n, np.int64), np.zeros(n, np.int64))


def _reset_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(cfg, device):
    """The base at the configured shape, made directly on `device` (random weights: no need to
    agree with other processes here), wrapped with LoRA as the platforms wrap it — plain: the
    default sdpa attention and no compilation, as a user's own loop would have it."""
    import torch

    from fl_llm.model.adapters import apply_lora
    from fl_llm.model.build import build_base

    plain = replace(cfg.model, attn_implementation="sdpa")
    with torch.device(device):
        base, tokenizer = build_base(plain, cfg.seed)
    n_base = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, cfg.model, cfg.seed, checkpointing=cfg.client.gradient_checkpointing)
    return model, tokenizer, n_base


def use_client_settings(model, cfg) -> None:
    """Switch the plain model to the platforms' own settings: model.attn_implementation and
    client.compile (compiled blocks stay compiled: measure the baseline first)."""
    from fl_llm.model.adapters import compile_each_block

    model.get_base_model().set_attn_implementation(cfg.model.attn_implementation)
    if cfg.client.compile:
        compile_each_block(model)


def fl_llm_step(model, tokenizer, cfg, enc: Encoded, pack_length: int, steps: int, warmup: int, batch: int) -> dict:
    """Useful tokens/s of the platforms' own training loop (one platform, this process)."""
    from fl_llm.client.train import local_train

    device = next(model.parameters()).device
    kw = dict(
        batch_size=batch,
        lr=cfg.client.lr,
        weight_decay=0.0,
        max_grad_norm=cfg.client.max_grad_norm,
        device=device,
        pad_id=tokenizer.pad_token_id,
        pack_length=pack_length,
        autocast=cfg.model.dtype == "bfloat16",
    )
    local_train(model, enc, steps=warmup, rng=np.random.default_rng(1), **kw)
    _reset_memory(device)
    t0 = time.perf_counter()
    out = local_train(model, enc, steps=steps, rng=np.random.default_rng(2), **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    return _throughput(out["tokens"], out["slots"], seconds, device)


def baseline_step(
    model, tokenizer, enc: Encoded, mode: str, *, batch: int, rows: int, pack_length: int, steps: int, warmup: int
) -> dict:
    """Useful tokens/s of plain transformers + peft as a user would write it: the model called
    with labels (full-sequence logits), AdamW, bf16 autocast on a GPU; `mode` padded (`batch`
    examples right-padded, attention mask) or packed (examples concatenated and cut into `rows`
    full rows of `pack_length`; rows=0: one batch's examples cut into as many rows as they fill)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(3)
    bf16 = device.type == "cuda" and next(model.get_base_model().parameters()).dtype == torch.bfloat16

    def draw():
        if mode == "packed":
            want = rows * pack_length if rows else 0
            chunks, n = [], 0
            for i in rng.permutation(len(enc)):
                chunks.append(enc.input_ids[i])
                n += len(chunks[-1])
                if (want and n >= want) or (not want and len(chunks) == batch):
                    break
            stream = np.concatenate(chunks)
            n_rows = rows or max(1, len(stream) // pack_length)
            ids = stream[: n_rows * pack_length].reshape(n_rows, -1) if len(stream) >= pack_length else stream[None]
            return ids, np.ones_like(ids)
        chosen = [enc.input_ids[i] for i in rng.choice(len(enc), size=min(batch, len(enc)), replace=False)]
        width = max(len(r) for r in chosen)
        ids, mask = np.full((len(chosen), width), pad), np.zeros((len(chosen), width), np.int64)
        for j, r in enumerate(chosen):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        return ids, mask

    def step():
        ids, mask = draw()
        ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        labels = ids_t.masked_fill(mask_t == 0, -100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids_t, attention_mask=mask_t, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(mask.sum()), int(mask.size)

    model.train()
    for _ in range(warmup):
        step()
    _reset_memory(device)
    t0 = time.perf_counter()
    tokens = slots = 0
    for _ in range(steps):
        t, s = step()
        tokens, slots = tokens + t, slots + s
    _sync(device)
    return _throughput(tokens, slots, time.perf_counter() - t0, device)


def _throughput(tokens: int, slots: int, seconds: float, device) -> dict:
    return {
        "useful_tokens_per_s": tokens / seconds,
        "useful_fraction": tokens / max(slots, 1),
        "seconds": seconds,
        "tokens": tokens,
        "peak_memory_gib": peak_memory(device) / 2**30,
        # on a GPU the peak allocated during this measurement; on a CPU the process's resident
        # high-water mark so far (it cannot be reset, so later variants include earlier peaks)
        "memory": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
    }


def federation(cfg, rounds: int) -> dict:
    """A real federated run of `cfg` for `rounds` rounds; the round time split and overhead."""
    from fl_llm.server.loop import run
    from fl_llm.tracking import read_metrics

    with tempfile.TemporaryDirectory(prefix="fl-llm-bench-") as tmp:
        cfg.server.rounds = rounds
        run(cfg, Path(tmp) / "run")
        rows = read_metrics(Path(tmp) / "run")
    per_round = []
    for r in rows:
        sec = r["seconds"]
        trained = [p for p in r["platforms"].values() if p.get("participated")]
        busy: dict = {}  # platforms on one host actor train in turn: their times add up
        for p in trained:
            busy[p.get("worker")] = busy.get(p.get("worker"), 0.0) + p["train_seconds"]
        local = max(busy.values())
        wall = sec["round"] - sec.get("evaluate", 0.0)
        per_round.append(
            {
                "round": r["round"],
                "wall_s": sec["round"],
                "train_s": local,
                "collect_s": sec["train"] - local,
                "broadcast_s": sec["broadcast"] + sec["sample"],
                "aggregate_s": sec["validate"] + sec["aggregate"],
                "save_s": sec["save"],
                "evaluate_s": sec.get("evaluate", 0.0),
                "overhead": 1.0 - local / wall,
                "useful_tokens_per_s": sum(p.get("tokens", 0) for p in trained) / wall,
                "bytes": r["bytes_up"] + r["bytes_down"],
                "peak_memory_gib": {n: p.get("peak_memory_bytes", 0) / 2**30 for n, p in r["platforms"].items()},
            }
        )
    steady = per_round[1:] or per_round
    return {
        "rounds": per_round,
        "overhead": float(np.mean([r["overhead"] for r in steady])),
        "useful_tokens_per_s": float(np.mean([r["useful_tokens_per_s"] for r in steady])),
        "bytes_per_round": float(np.mean([r["bytes"] for r in steady])),
        "platforms": len(rows[0]["platforms"]) if rows else 0,
    }


def hardware() -> dict:
    import os

    import torch

    info = {"cpu": host.processor() or host.machine(), "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def peak_flops(peak_tflops: float | None, hw: dict) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    gpu = hw.get("gpu", "")
    return next((v * 1e12 for k, v in KNOWN_PEAK_TFLOPS.items() if k in gpu), None)


def _variant(name, model, tokenizer, cfg, enc, pack_length, steps, warmup, baseline_batch, rows) -> dict:
    """One step measurement: fl_llm's loop (packed, or padded at the padded baseline's batch) or
    the baseline's (packed rows at the platforms' batch, or padded)."""
    if name == "fl_llm_packed":
        return fl_llm_step(model, tokenizer, cfg, enc, pack_length, steps, warmup, cfg.client.batch_size)
    if name == "fl_llm_padded":
        return fl_llm_step(model, tokenizer, cfg, enc, 0, steps, warmup, baseline_batch)
    mode, batch = ("packed", cfg.client.batch_size) if name == "baseline_packed" else ("padded", baseline_batch)
    kw = {"batch": batch, "rows": rows, "pack_length": pack_length, "steps": steps, "warmup": warmup}
    return baseline_step(model, tokenizer, enc, mode, **kw)


def bench(
    cfg,
    *,
    shape: str,
    steps: int,
    warmup: int,
    pack_length: int,
    rounds: int,
    examples: int,
    peak_tflops,
    variants=VARIANTS,
    baseline_batch: int = 16,
    baseline_rows: int | None = None,
):
    """Everything above, as one dict (what `fl-llm bench` writes). The baseline variants run
    first, on the plain model; then the model takes the platforms' settings for fl_llm's."""
    import gc

    import torch

    hw = hardware()
    device = resolve_device(cfg.client.device)
    enc = bench_examples(examples, vocab=8000, max_length=cfg.model.max_length, seed=cfg.seed)
    lengths = np.array([len(r) for r in enc.input_ids])
    rows = BASELINE_ROWS[shape] if baseline_rows is None else baseline_rows
    result = {
        "hardware": hw,
        "shape": shape,
        "model": {k: getattr(cfg.model.tiny, k) for k in SHAPES[shape]},
        "lora": {"r": cfg.model.lora.r, "target_modules": cfg.model.lora.target_modules},
        "settings": {
            "dtype": cfg.model.dtype,
            "attn_implementation": cfg.model.attn_implementation,
            "compile": cfg.client.compile,
            "gradient_checkpointing": cfg.client.gradient_checkpointing,
        },
        "batch_size": cfg.client.batch_size,
        "pack_length": pack_length,
        "baseline": {"padded_batch": baseline_batch, "packed_rows": rows or "one batch's examples"},
        "lengths": {"mean": float(lengths.mean()), "p50": float(np.median(lengths)), "max": int(lengths.max())},
        "step": {},
    }
    if not variants:  # only the federated run
        result["federation"] = federation(cfg, rounds)
        return result
    model, tokenizer, n_base = _model(cfg, device)
    result["base_parameters"] = n_base
    peak = peak_flops(peak_tflops, hw)
    switched = False
    for name in VARIANTS:
        if name not in variants:
            continue
        if name.startswith("fl_llm") and not switched:
            use_client_settings(model, cfg)
            switched = True
        try:
            row = _variant(name, model, tokenizer, cfg, enc, pack_length, steps, warmup, baseline_batch, rows)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            row = {"oom": True}
        if "useful_tokens_per_s" in row:
            row["flops_per_s"] = 4.0 * n_base * row["useful_tokens_per_s"]
            row["mfu"] = row["flops_per_s"] / peak if peak else None
        result["step"][name] = row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step = {k: v.get("useful_tokens_per_s") for k, v in result["step"].items()}
    if step.get("fl_llm_packed"):
        result["ratio"] = {
            f"vs_{k}": step["fl_llm_packed"] / step[k] for k in ("baseline_packed", "baseline_padded") if step.get(k)
        }
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the federated run's platforms need this GPU
    if rounds:
        result["federation"] = federation(cfg, rounds)
    return result


def summary_lines(result: dict) -> list[str]:
    lines = [f"hardware: {json.dumps(result['hardware'])}", f"shape {result['shape']}: {result['model']}"]
    for name, row in result["step"].items():
        if row.get("oom"):
            lines.append(f"  {name:<16} out of memory")
            continue
        mfu = f"  MFU {row['mfu']:.3f}" if row.get("mfu") is not None else ""
        lines.append(
            f"  {name:<16} {row['useful_tokens_per_s']:>10.0f} useful tokens/s  "
            f"({row['useful_fraction']:.0%} of positions useful){mfu}  peak {row['peak_memory_gib']:.2f} GiB"
        )
    for k, v in result.get("ratio", {}).items():
        lines.append(f"  fl_llm packed / {k[3:]}: {v:.2f}x")
    if "federation" in result:
        f = result["federation"]
        lines.append(
            f"federation: {f['platforms']} platforms, overhead {f['overhead']:.1%} of round time (steady state), "
            f"{f['useful_tokens_per_s']:.0f} useful tokens/s, {f['bytes_per_round'] / 1e6:.2f} MB per round"
        )
        for row in f["rounds"]:
            lines.append(
                f"  round {row['round']}: wall {row['wall_s']:.2f} s = train {row['train_s']:.2f} + collect "
                f"{row['collect_s']:.2f} + broadcast {row['broadcast_s']:.3f} + aggregate {row['aggregate_s']:.3f} "
                f"+ save {row['save_s']:.3f} + evaluate {row['evaluate_s']:.2f}  (overhead {row['overhead']:.1%})"
            )
    return lines
