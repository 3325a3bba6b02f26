"""A seeded synthetic e-commerce world: a shared catalog, platforms with different customers.

Why synthetic: a laptop run (and every test) needs data with a real, learnable signal and a
non-IID split across companies, without downloading anything. The world is a small latent-factor
model, drawn with numpy in a few vectorised calls:

- a catalog shared by every platform: items with a category, a brand, a price and a hidden
  quality that shows, noisily, as the star rating customers see;
- platforms (separate companies) with their own category mix and their own customers, whose
  tastes are centred differently on each platform;
- a customer likes an item when taste·category + quality + noise > 0.

A platform only ever builds its own slice: `platform_records(world, platform, ...)` draws that
platform's customers from a generator seeded by (seed, platform), so no records of another
platform are ever made inside its process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (category, brands, median price in dollars)
CATEGORIES: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("sneakers", ("Stride", "Kicko", "Peakfoot", "Urbanstep"), 80.0),
    ("dresses", ("Lumiere", "Velva", "Maren", "Tulle"), 60.0),
    ("phones", ("Orbit", "Nexa", "Pulse", "Kite"), 500.0),
    ("laptops", ("Novo", "Arcbook", "Zenpad", "Corex"), 900.0),
    ("headphones", ("Sonix", "Echo", "Bassline", "Hush"), 120.0),
    ("skincare", ("Dew", "Aura", "Petal", "Glowe"), 25.0),
    ("snacks", ("Crunchy", "Munch", "Nibbl", "Yumo"), 5.0),
    ("coffee", ("Kava", "Roastly", "Bean", "Mocha"), 15.0),
    ("toys", ("Bloxy", "Tiny", "Joyo", "Plip"), 30.0),
    ("books", ("Inkwell", "Folio", "Quill", "Pagely"), 18.0),
    ("furniture", ("Oakly", "Nest", "Loft", "Birch"), 250.0),
    ("outdoor", ("Trailer", "Summit", "Fjord", "Ridge"), 70.0),
)

# Platform archetypes: a name and the categories it mostly sells (weights before normalising).
ARCHETYPES: tuple[tuple[str, dict[str, float]], ...] = (
    ("fashion-mall", {"sneakers": 4, "dresses": 5, "skincare": 4, "outdoor": 1}),
    ("gadget-hub", {"phones": 5, "laptops": 4, "headphones": 5, "toys": 1}),
    ("home-market", {"snacks": 4, "coffee": 4, "furniture": 3, "books": 2, "toys": 2}),
    ("sport-outlet", {"sneakers": 4, "outdoor": 5, "headphones": 2, "snacks": 1}),
    ("book-nook", {"books": 6, "coffee": 2, "toys": 2}),
    ("kids-corner", {"toys": 6, "books": 2, "snacks": 2, "dresses": 1}),
)

TASTE_DIM = 4


@dataclass(frozen=True)
class World:
    """The shared part of the world: catalog and platform profiles (no customer records)."""

    seed: int
    item_category: np.ndarray  # (items,) int
    item_brand: np.ndarray  # (items,) int, index into the category's brands
    item_price: np.ndarray  # (items,) float
    item_quality: np.ndarray  # (items,) float, hidden
    item_rating: np.ndarray  # (items,) float, 1.0..5.0, what customers see
    category_taste: np.ndarray  # (categories, TASTE_DIM)
    platform_names: tuple[str, ...]
    platform_mix: np.ndarray  # (platforms, categories), rows sum to 1
    platform_taste: np.ndarray  # (platforms, TASTE_DIM), customer taste centre
    platform_bias: np.ndarray  # (platforms,), how easily that platform's customers are pleased

    @property
    def num_platforms(self) -> int:
        return len(self.platform_names)

    def item_text(self, idx: np.ndarray) -> list[str]:
        """How an item reads in a prompt: brand, category and the star rating shown on the site."""
        return [
            f"{CATEGORIES[c][1][b]} {CATEGORIES[c][0]} {r:.1f}★"
            for c, b, r in zip(self.item_category[idx], self.item_brand[idx], self.item_rating[idx])
        ]


def platform_names(num_platforms: int) -> tuple[str, ...]:
    names = []
    for i in range(num_platforms):
        base = ARCHETYPES[i % len(ARCHETYPES)][0]
        names.append(base if i < len(ARCHETYPES) else f"{base}-{i // len(ARCHETYPES) + 1}")
    return tuple(names)


def make_world(seed: int, num_platforms: int, items_per_category: int = 40) -> World:
    """The catalog and platform profiles, identical in every process for the same seed."""
    rng = np.random.default_rng([seed, 0xC47A])
    n_cat = len(CATEGORIES)
    category = np.repeat(np.arange(n_cat), items_per_category)
    brand = rng.integers(0, 4, size=category.size)
    median = np.array([c[2] for c in CATEGORIES])[category]
    price = np.round(median * rng.lognormal(0.0, 0.35, size=category.size), 2)
    quality = rng.normal(0.0, 1.0, size=category.size)
    rating = np.clip(np.round(3.8 + 0.55 * quality + rng.normal(0, 0.15, category.size), 1), 1.0, 5.0)
    cat_index = {c[0]: i for i, c in enumerate(CATEGORIES)}
    mix = np.full((num_platforms, n_cat), 0.15)
    for p in range(num_platforms):
        for name, w in ARCHETYPES[p % len(ARCHETYPES)][1].items():
            mix[p, cat_index[name]] += w
    mix /= mix.sum(axis=1, keepdims=True)
    return World(
        seed=seed,
        item_category=category,
        item_brand=brand,
        item_price=price,
        item_quality=quality,
        item_rating=rating,
        category_taste=rng.normal(0.0, 1.0, size=(n_cat, TASTE_DIM)),
        platform_names=platform_names(num_platforms),
        platform_mix=mix,
        platform_taste=rng.normal(0.0, 0.6, size=(num_platforms, TASTE_DIM)),
        platform_bias=rng.normal(0.0, 0.3, size=num_platforms),
    )


def _utility(world: World, platform: int, taste: np.ndarray, items: np.ndarray, rng) -> np.ndarray:
    """How much each customer (row of `taste`) likes each of its items (row of `items`)."""
    cat_vec = world.category_taste[world.item_category[items]]  # (n, k, d)
    affinity = np.einsum("nd,nkd->nk", taste, cat_vec) / np.sqrt(TASTE_DIM)
    noise = rng.normal(0.0, 0.6, size=items.shape)
    return 1.2 * affinity + 0.9 * world.item_quality[items] + world.platform_bias[platform] + noise


def recommendation_records(world: World, platform: int, n: int, *, liked: int, disliked: int, split: str) -> list[dict]:
    """`n` yes/no recommendation examples of one platform's customers.

    Each record shows a customer's liked and disliked items and a candidate; `label` is 1 when
    the customer liked the candidate. Train and eval splits use different customers.
    """
    split_id = {"train": 1, "eval": 2}[split]
    rng = np.random.default_rng([world.seed, 0x5EC, platform, split_id])
    draws = liked + disliked + 1 + 24  # enough items per customer to find liked and disliked ones
    rows: list[dict] = []
    while len(rows) < n:
        m = int((n - len(rows)) * 1.2) + 8
        taste = world.platform_taste[platform] + rng.normal(0.0, 1.0, size=(m, TASTE_DIM))
        cats = rng.choice(len(CATEGORIES), size=(m, draws), p=world.platform_mix[platform])
        within = rng.integers(0, world.item_category.size // len(CATEGORIES), size=(m, draws))
        items = cats * (world.item_category.size // len(CATEGORIES)) + within
        likes = _utility(world, platform, taste, items, rng) > 0
        target, hist, hist_like = items[:, 0], items[:, 1:], likes[:, 1:]
        # Stable order: liked history first (in draw order), then disliked.
        liked_pos = np.argsort(~hist_like, axis=1, kind="stable")[:, :liked]
        disliked_pos = np.argsort(hist_like, axis=1, kind="stable")[:, :disliked]
        ok = (hist_like.sum(1) >= liked) & ((~hist_like).sum(1) >= disliked)
        for i in np.flatnonzero(ok)[: n - len(rows)]:
            rows.append(
                {
                    "liked": ", ".join(world.item_text(hist[i, liked_pos[i]])),
                    "disliked": ", ".join(world.item_text(hist[i, disliked_pos[i]])) or "none",
                    "candidate": world.item_text(target[i : i + 1])[0],
                    "label": int(likes[i, 0]),
                }
            )
    return rows
