"""Where a platform's records come from. Called inside the platform's own process only."""

from __future__ import annotations

from fl_llm.config import RunConfig
from fl_llm.data import synthetic


def platform_names(cfg: RunConfig) -> tuple[str, ...]:
    """Names the driver can show without touching any records."""
    return synthetic.platform_names(cfg.data.num_platforms)


def load_platform_data(cfg: RunConfig, platform: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of one platform."""
    syn = cfg.data.synthetic
    sizes = syn.train_examples
    n_train = sizes[platform] if len(sizes) > 1 else sizes[0]
    world = synthetic.make_world(cfg.seed, cfg.data.num_platforms)
    kw = dict(liked=syn.history_liked, disliked=syn.history_disliked)
    train = synthetic.recommendation_records(world, platform, n_train, split="train", **kw)
    held_out = synthetic.recommendation_records(world, platform, syn.eval_examples, split="eval", **kw)
    return train, held_out
