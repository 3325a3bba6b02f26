"""A seeded synthetic e-commerce world: a shared catalog, platforms with different customers.

Why synthetic: a laptop run (and every test) needs data with a real, learnable signal and a
non-IID split across companies, without downloading anything. The world is a small latent-factor
model, drawn with numpy in a few vectorised calls:

- a catalog shared by every platform: items with a category, a brand, a price and a hidden
  quality that shows, noisily, as the star rating customers see;
- platforms (separate companies) with their own category mix and their own customers, whose
  tastes are centred differently on each platform;
- a customer likes an item when taste·category + quality + noise > 0.

Four tasks read the world: `recommendation` (liked / disliked history -> will they like the
candidate; candidates come in lists of `LIST_SIZE` per customer for HR@K/NDCG@K), `ctr` (user,
ad, context -> click), `fraud` (transaction and account history -> fraud) and `review` (review
text -> positive or negative). `simulate_events` draws the behaviour log itself (view, click,
cart, buy, rating) vectorised: about a million events a second.

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
LIST_SIZE = 5  # candidates per customer in recommendation records: 1 liked, 4 not


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
    """About `n` yes/no recommendation examples, in lists of `LIST_SIZE` per customer.

    Each customer shows `liked` liked and `disliked` disliked items; their candidate list holds
    one item they like and `LIST_SIZE - 1` they do not (the usual 1-positive ranking protocol),
    so `group` ties a list together for HR@K / NDCG@K. Train and eval use different customers.
    """
    rng = _split_rng(world, platform, split, 1)
    customers = max(1, -(-n // LIST_SIZE))
    need_like, need_dislike = liked + 1, disliked + LIST_SIZE - 1
    draws = 2 * (need_like + need_dislike) + 24
    rows: list[dict] = []
    group = 0
    while group < customers:
        m = int((customers - group) * 1.3) + 8
        taste = world.platform_taste[platform] + rng.normal(0.0, 1.0, size=(m, TASTE_DIM))
        items = _sample_items(world, platform, (m, draws), rng)
        likes = _utility(world, platform, taste, items, rng) > 0
        like_pos = np.argsort(~likes, axis=1, kind="stable")  # liked draws first, in draw order
        dislike_pos = np.argsort(likes, axis=1, kind="stable")
        ok = (likes.sum(1) >= need_like) & ((~likes).sum(1) >= need_dislike)
        for i in np.flatnonzero(ok)[: customers - group]:
            hist_like = items[i, like_pos[i, :liked]]
            hist_dislike = items[i, dislike_pos[i, :disliked]]
            cands = np.r_[items[i, like_pos[i, liked]], items[i, dislike_pos[i, disliked:need_dislike]]]
            order = rng.permutation(LIST_SIZE)
            shared = {
                "liked": ", ".join(world.item_text(hist_like)),
                "disliked": ", ".join(world.item_text(hist_dislike)) or "none",
                "group": group,
            }
            for j in order:
                rows.append(
                    {
                        **shared,
                        "candidate": world.item_text(cands[j : j + 1])[0],
                        "category": CATEGORIES[world.item_category[cands[j]]][0],
                        "label": int(j == 0),
                    }
                )
            group += 1
    return rows


COUNTRIES = ("US", "DE", "FR", "GB", "JP", "BR", "IN", "NG", "CN", "MX")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
DEVICES = ("mobile", "desktop", "tablet", "app")
EVENT_TYPES = ("view", "click", "cart", "buy")


def _split_rng(world: World, platform: int, split: str, task: int) -> np.random.Generator:
    return np.random.default_rng([world.seed, 0x5EC, platform, {"train": 1, "eval": 2}[split], task])


def _customers(world: World, platform: int, m: int, rng) -> dict[str, np.ndarray]:
    """m customers of one platform: taste, age band, home country, account age, device."""
    taste = world.platform_taste[platform] + rng.normal(0.0, 1.0, size=(m, TASTE_DIM))
    home = rng.choice(len(COUNTRIES), size=m, p=_country_mix(platform))
    return {
        "taste": taste,
        "age": rng.integers(0, len(AGE_BANDS), size=m),
        "country": home,
        "account_days": np.round(rng.lognormal(5.0, 1.2, size=m)).astype(int) + 1,
        "device": rng.integers(0, len(DEVICES), size=m),
    }


def _country_mix(platform: int) -> np.ndarray:
    w = np.ones(len(COUNTRIES))
    w[platform % 5] += 12.0  # each platform is mostly domestic
    return w / w.sum()


def _sample_items(world: World, platform: int, shape, rng) -> np.ndarray:
    per_cat = world.item_category.size // len(CATEGORIES)
    cats = rng.choice(len(CATEGORIES), size=shape, p=world.platform_mix[platform])
    return cats * per_cat + rng.integers(0, per_cat, size=shape)


def simulate_events(world: World, platform: int, n_events: int, seed_offset: int = 0) -> dict[str, np.ndarray]:
    """A behaviour log of `n_events` rows (view -> click -> cart -> buy funnel, with ratings).

    Columns: user, item, event (index into EVENT_TYPES), hour, rating (0 unless bought).
    Vectorised: a million events take well under a second.
    """
    rng = np.random.default_rng([world.seed, 0xE7, platform, seed_offset])
    n_users = max(10, n_events // 50)
    users = _customers(world, platform, n_users, rng)
    views = max(1, int(n_events / 1.6))  # each view yields on average ~0.6 further events
    u = rng.integers(0, n_users, size=views)
    items = _sample_items(world, platform, (views,), rng)
    util = _utility(world, platform, users["taste"][u], items[:, None], rng)[:, 0]
    p_click = 1 / (1 + np.exp(-(util - 0.5)))
    click = rng.random(views) < p_click
    cart = click & (rng.random(views) < 1 / (1 + np.exp(-(util - 1.0))))
    buy = cart & (rng.random(views) < 0.6)
    stage = click.astype(int) + cart + buy  # last funnel step reached per view
    reps = stage + 1
    user = np.repeat(u, reps)
    item = np.repeat(items, reps)
    offsets = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    event = offsets.astype(np.int8)
    hour = np.repeat(np.clip(np.round(rng.normal(20, 4, size=views)) % 24, 0, 23).astype(np.int8), reps)
    stars = np.clip(np.round(3.2 + 1.1 * util + rng.normal(0, 0.6, size=views)), 1, 5).astype(np.int8)
    rating = np.where(event == 3, np.repeat(stars, reps), 0).astype(np.int8)
    keep = slice(0, n_events)
    return {"user": user[keep], "item": item[keep], "event": event[keep], "hour": hour[keep], "rating": rating[keep]}


def _top_interests(world: World, taste: np.ndarray, k: int) -> list[str]:
    """Each customer's `k` favourite categories, as a profile shows them ("phones and laptops"):
    the part of their hidden taste a platform knows from past behaviour."""
    top = np.argsort(-(taste @ world.category_taste.T), axis=1)[:, :k]
    return [" and ".join(CATEGORIES[c][0] for c in row) for row in top]


def ctr_records(world: World, platform: int, n: int, *, split: str) -> list[dict]:
    """Ad impressions: who saw which ad where and when; `label` 1 when clicked.

    Clicks follow the customer's taste for the ad's category (the profile shows their two
    favourite categories), the discount, whether the ad matches the page being browsed, the ad
    slot and the hour.
    """
    rng = _split_rng(world, platform, split, 3)
    cust = _customers(world, platform, n, rng)
    ad = _sample_items(world, platform, (n, 1), rng)
    browsing = np.where(rng.random(n) < 0.5, world.item_category[ad[:, 0]], rng.integers(0, len(CATEGORIES), n))
    discount = rng.choice([0, 10, 20, 30, 50], size=n, p=[0.4, 0.2, 0.2, 0.12, 0.08])
    slot = rng.integers(1, 6, size=n)
    hour = rng.integers(0, 24, size=n)
    affinity = _utility(world, platform, cust["taste"], ad, rng)[:, 0]
    logit = (
        0.9 * affinity
        + 1.2 * (browsing == world.item_category[ad[:, 0]])
        + 0.035 * discount
        - 0.35 * (slot - 1)
        + 0.4 * ((hour >= 19) & (hour <= 23))
        - 1.6
    )
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    names = world.item_text(ad[:, 0])
    interests = _top_interests(world, cust["taste"], 2)
    return [
        {
            "user": f"{AGE_BANDS[cust['age'][i]]}, {DEVICES[cust['device'][i]]}, into {interests[i]}",
            "context": f"browsing {CATEGORIES[browsing[i]][0]} at {hour[i]:02d}h, slot {slot[i]}",
            "ad": f"{names[i]} ${world.item_price[ad[i, 0]]:.0f}" + (f", {discount[i]}% off" if discount[i] else ""),
            "category": CATEGORIES[world.item_category[ad[i, 0]]][0],
            "label": int(click[i]),
        }
        for i in range(n)
    ]


def fraud_records(world: World, platform: int, n: int, *, split: str) -> list[dict]:
    """Card transactions with account context; `label` 1 for fraud (about 8%).

    Fraud shows as bursts after an account takeover (many orders in the last hour from a new
    device), shipping to a country other than the account's, amounts far above the customer's
    usual, and odd hours — each alone is a weak signal, together a strong one.
    """
    rng = _split_rng(world, platform, split, 4)
    cust = _customers(world, platform, n, rng)
    fraud = rng.random(n) < 0.08 + 0.04 * (platform % 3 == 1)
    usual = np.round(rng.lognormal(3.6, 0.6, size=n))
    ratio = np.where(fraud, rng.lognormal(1.6, 0.8, size=n), rng.lognormal(0.0, 0.5, size=n))
    amount = np.round(usual * ratio, 2)
    hour = np.where(fraud & (rng.random(n) < 0.6), rng.integers(0, 6, n), rng.integers(7, 24, n))
    burst = np.where(fraud & (rng.random(n) < 0.6), rng.integers(3, 12, n), rng.poisson(0.3, n))
    new_device = np.where(fraud, rng.random(n) < 0.7, rng.random(n) < 0.1)
    other = (cust["country"] + rng.integers(1, len(COUNTRIES), n)) % len(COUNTRIES)
    ship = np.where(fraud & (rng.random(n) < 0.55) | (~fraud & (rng.random(n) < 0.05)), other, cust["country"])
    days = np.where(fraud & (rng.random(n) < 0.4), rng.integers(0, 5, n), cust["account_days"])
    item = _sample_items(world, platform, (n,), rng)
    names = world.item_text(item)
    return [
        {
            "account": f"{days[i]} days old, {COUNTRIES[cust['country'][i]]}, usual order ${usual[i]:.0f}",
            "transaction": (
                f"${amount[i]:.2f} for {names[i].rsplit(' ', 1)[0]} at {hour[i]:02d}h, ship to "
                f"{COUNTRIES[ship[i]]}, {'new' if new_device[i] else 'known'} device, "
                f"{burst[i]} orders in the last hour"
            ),
            "category": CATEGORIES[world.item_category[item[i]]][0],
            "label": int(fraud[i]),
        }
        for i in range(n)
    ]


_ASPECTS = ("quality", "delivery", "price", "packaging", "service")
_GOOD = ("great", "excellent", "love it", "works perfectly", "fast", "worth it", "good")
_BAD = ("terrible", "broke", "disappointed", "slow", "waste of money", "poor", "bad")
_NEUTRAL = ("okay", "as described", "average", "fine", "arrived")


def review_records(world: World, platform: int, n: int, *, split: str) -> list[dict]:
    """Review text for a bought item; `label` 1 for a positive review (4 or 5 stars).

    The text mixes sentiment words whose balance follows the (hidden) star rating with neutral
    filler and aspects, so single words are noisy evidence and the balance decides.
    """
    rng = _split_rng(world, platform, split, 5)
    cust = _customers(world, platform, n, rng)
    item = _sample_items(world, platform, (n, 1), rng)
    util = _utility(world, platform, cust["taste"], item, rng)[:, 0]
    stars = np.clip(np.round(3.3 + 1.0 * util + rng.normal(0, 0.5, n)), 1, 5).astype(int)
    n_words = rng.integers(2, 5, size=n)
    p_good = np.array([0.1, 0.25, 0.5, 0.75, 0.9])[stars - 1]
    names = world.item_text(item[:, 0])
    rows = []
    for i in range(n):
        words = []
        for _ in range(n_words[i]):
            pool = _GOOD if rng.random() < p_good[i] else _BAD
            if rng.random() < 0.3:
                pool = _NEUTRAL
            words.append(f"{_ASPECTS[rng.integers(len(_ASPECTS))]} {pool[rng.integers(len(pool))]}")
        rows.append(
            {
                "item": names[i].rsplit(" ", 1)[0],
                "review": ", ".join(words),
                "category": CATEGORIES[world.item_category[item[i, 0]]][0],
                "label": int(stars[i] >= 4),
            }
        )
    return rows
