"""How the platforms' updates reach the driver, as one interface whatever the transport: plain
(or compressed) updates the driver reads one by one, or masked ones under secure aggregation
whose sum alone is revealed. The round loop calls, per attempt at a round:

    open      who of the cohort trains (secure: those who finished the key and share exchange)
    masking   what platform i needs to mask its update (None for a plain uplink)
    accept    the received answers → (accepted, {platform: why rejected}); decodes, checks,
              and under secure aggregation unmasks the survivors' sum
    inputs    the accepted updates as the strategy takes them: (updates, weights, DP statistics)
    record    what the round log says about the uplink

so that validation and aggregation are one call each.
"""

from __future__ import annotations

from fl_llm.compression import decompress
from fl_llm.config import RunConfig
from fl_llm.server import secure
from fl_llm.server.backends import Collected
from fl_llm.server.guard import check_update, judge_update, outliers
from fl_llm.strategies import Strategy
from fl_llm.strategies.lora import to_rank, update_to_global_rank

CLIPPED_WARNING = 0.001  # secure aggregation: warn when more of an update is clipped to the ring's range


def make_uplink(cfg: RunConfig, strategy: Strategy, ranks: list[int], info: dict):
    """The uplink the config asks for: secure aggregation, or plain/compressed updates."""
    kind = SecureUplink if cfg.privacy.secagg.enabled else PlainUplink
    return kind(cfg, strategy, ranks, info)


class PlainUplink:
    """Plain or compressed updates: each decoded, checked against the global adapter as its
    platform holds it, and brought to the global rank."""

    def __init__(self, cfg: RunConfig, strategy: Strategy, ranks: list[int], info: dict):
        self.cfg, self.strategy, self.ranks, self.info = cfg, strategy, ranks, info

    def open(self, backend, cohort: list[int], rnd: int, fed) -> list[int]:
        return cohort

    def masking(self, i: int, fed) -> dict | None:
        return None

    def accept(self, backend, trained: Collected, fed) -> tuple[list[int], dict[int, str]]:
        for r in trained.results.values():  # a compressed update, decoded
            if "payload" in r:
                r["update"] = decompress(r.pop("payload"))
        return validate(trained, fed, self.ranks, self.strategy, self.cfg)

    def inputs(self, trained: Collected, accepted: list[int], fed, rnd: int) -> tuple[list, list, dict]:
        """The accepted updates at the global rank, weighted by example count — or, under
        client-level DP, their clipped and noised mean as the one update."""
        lora, top = self.cfg.model.lora, max(self.ranks)
        updates = [
            update_to_global_rank(trained.results[i]["update"], fed.global_state, self.ranks[i], lora.alpha, top)
            for i in accepted
        ]
        weights = [trained.results[i]["num_examples"] for i in accepted]
        if fed.privacy.level != "client":
            return updates, weights, {}
        sent = {k: fed.global_state[k] for k in self.strategy.upload_keys(fed.global_state)}
        noised, dp_stats = fed.privacy.private_mean(updates, sent, self.cfg.seed, rnd)
        return [noised], [1.0], dp_stats

    def record(self, record: dict, trained: Collected, names: dict, progress) -> None:
        pass


class SecureUplink(PlainUplink):
    """Masked updates (Bonawitz et al. 2017): the driver checks each masked upload's form, then the
    survivors' shares unmask the sum; it never holds one platform's update."""

    def __init__(self, cfg: RunConfig, strategy: Strategy, ranks: list[int], info: dict):
        super().__init__(cfg, strategy, ranks, info)
        self.sr: secure.SecureRound | None = None
        self.unmasked = None

    def open(self, backend, cohort: list[int], rnd: int, fed) -> list[int]:
        self.sr = secure.open_round(backend, cohort, rnd, self.cfg, self.cfg.server.round_timeout_s)
        self.unmasked = None
        return self.sr.parties

    def masking(self, i: int, fed) -> dict | None:
        return secure.masking(self.sr, i, fed.privacy, self.info)

    def accept(self, backend, trained: Collected, fed) -> tuple[list[int], dict[int, str]]:
        accepted, rejected, self.unmasked = secure.unmask_round(
            self.sr, backend, trained, fed.global_state, self.strategy, self.cfg
        )
        for i, nbytes in self.sr.bytes_down.items():  # relayed keys, shares and lists
            fed.downlink.add(i, nbytes)
        return accepted, rejected

    def inputs(self, trained: Collected, accepted: list[int], fed, rnd: int) -> tuple[list, list, dict]:
        """Only the (weighted, clipped) sum exists: the one update is its mean (noised under DP)."""
        return secure.mean(
            self.unmasked, accepted, fed.global_state, fed.privacy, self.strategy, self.info, self.cfg, rnd
        )

    def record(self, record: dict, trained: Collected, names: dict, progress) -> None:
        record.pop("aggregation_error", None)  # needs the individual updates
        record.update(secure.record(self.sr, trained, names))
        clipped = record["secagg"].get("clipped", 0.0)
        if clipped > CLIPPED_WARNING:
            progress.warn(
                f"round {self.sr.round}: up to {clipped:.2%} of a platform's update values were clipped to "
                f"±privacy.secagg.clip_range ({self.cfg.privacy.secagg.clip_range:g}); raise it"
            )


def validate(
    trained: Collected, fed, ranks: list[int], strategy: Strategy, cfg: RunConfig
) -> tuple[list[int], dict[int, str]]:
    """(platforms whose update may be aggregated, {platform: why its update was rejected}).

    Each update must match the global adapter as that platform holds it: its LoRA rank, and only
    the tensors the strategy has it send (FFA: no A; FedSA: no B); finite; within
    server.max_update_norm when set; and not an outlier against the median of the round's other
    and recent updates (server.outlier_factor; off under client-level DP, where clipping bounds
    every update and a rule that depends on the others' norms would break its sensitivity)."""
    accepted, rejected = [], {}
    global_state = fed.global_state
    sent = strategy.upload_keys(global_state)
    for i in sorted(trained.results):
        own = to_rank(global_state, ranks[i], cfg.model.lora.alpha, max(ranks))
        r = trained.results[i]
        why, r["update_norm"] = judge_update(r.get("update"), {k: own[k] for k in sent}, cfg.server.max_update_norm)
        if why is None and strategy.local_term == "scaffold":
            why = check_update(trained.results[i].get("extra", {}).get("c"), own)
            why = why and f"control variate: {why}"
        if why is None:
            accepted.append(i)
        else:
            rejected[i] = f"update rejected: {why}"
    if cfg.privacy.dp.level != "client":
        norms = {i: trained.results[i]["update_norm"] for i in accepted}
        for i, why in outliers(norms, fed.recent_norms, cfg.server.outlier_factor).items():
            accepted.remove(i)
            rejected[i] = f"update rejected: {why}"
        # the reference for the next rounds: this round's accepted norms, and the two rounds before
        fed.recent_norms = (fed.recent_norms + [norms[i] for i in accepted])[-3 * max(len(norms), 1) :]
    return accepted, rejected
