"""The plots fl-llm writes: a metric per round (one line per arm or strategy) and reliability
diagrams per platform, with platform names drawn in whatever installed font has their
characters. matplotlib without a display (Agg), imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_round(series: dict[str, tuple[list, list | None]], path: Path, title: str, ylabel: str) -> None:
    """One line per label over the rounds; where a standard deviation is given (a mean over
    seeds), one standard deviation is shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, (ys, sd) in series.items():
        xs = range(1, len(ys) + 1)
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if sd:
            lo = [y - d for y, d in zip(ys, sd)]
            hi = [y + d for y, d in zip(ys, sd)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(detail: dict, path: Path) -> str | None:
    """Reliability diagram per platform: positive rate against mean predicted probability in each
    bin, one line per arm; the diagonal is perfect calibration. Returns a warning for the user when
    some platform's name could not be drawn (its panel is numbered instead)."""
    platforms = sorted({name for arm in detail.values() for name, d in arm.items() if d.get("reliability")})
    if not platforms:
        return None
    plt = _pyplot()
    rc, undrawn = fonts_that_draw(platforms)
    cols = min(4, len(platforms))
    rows = (len(platforms) + cols - 1) // cols
    with plt.rc_context(rc):
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
        _reliability_panels(axes, platforms, detail, undrawn)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    if not undrawn:
        return None
    order = ", ".join(f"{i} {n}" for i, n in enumerate(platforms, 1))
    return (
        f"{path.name}: no installed font draws the names {', '.join(sorted(undrawn))}, so its panels are numbered "
        f"({order}); install a font that has them (e.g. Noto Sans CJK) to see the names"
    )


def _reliability_panels(axes, platforms: list[str], detail: dict, undrawn: set[str]) -> None:
    for i, (ax, name) in enumerate(zip(axes.flat, platforms), 1):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for arm, per in detail.items():
            bins = per.get(name, {}).get("reliability")
            if bins:
                ax.plot([b["mean_probability"] for b in bins], [b["positive_rate"] for b in bins], marker="o", ms=3,
                        label=f"{arm} (ECE {per[name]['ece']:.3f})")  # fmt: skip
        ax.set_title(f"platform {i}" if name in undrawn else name, fontsize=9)
        ax.set_xlabel("predicted probability", fontsize=8)
        ax.set_ylabel("observed rate", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(platforms) :]:
        ax.axis("off")


def fonts_that_draw(texts) -> tuple[dict, set[str]]:
    """matplotlib settings under which `texts` (platform names: Chinese shops' among them) are
    drawn, and the texts that no installed font can draw. matplotlib's default font has no CJK
    characters and it does not look for one by itself; given a list of fonts it takes each
    character from the first font that has it, so the fonts that cover what the default lacks are
    put after it."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    default = font_manager.get_font(font_manager.findfont(font_manager.FontProperties(family=["sans-serif"])))
    missing = {ord(c) for t in texts for c in t} - set(default.get_charmap())
    if not missing:
        return {}, set()
    fallbacks, seen = [], set()
    for entry in sorted(font_manager.fontManager.ttflist, key=lambda e: e.fname):
        if not missing:
            break
        if entry.name in seen:
            continue
        seen.add(entry.name)
        try:
            covered = missing & set(FT2Font(entry.fname).get_charmap())
        except (OSError, RuntimeError):  # a font file FreeType cannot read
            continue
        if covered:
            fallbacks.append(entry.name)
            missing -= covered
    undrawn = {t for t in texts if any(ord(c) in missing for c in t)}
    return {"font.family": [default.family_name, *fallbacks]}, undrawn  # named: a generic family resolves to one font
