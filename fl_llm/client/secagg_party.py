"""A platform's side of secure aggregation (Bonawitz et al., CCS 2017; the pieces are in
`fl_llm.privacy.secagg`): fresh keys each round, encrypted shares of its mask secrets for its
peers, its update weighted, clipped, quantized into the ring and masked, and at the end the
shares that unmask the survivors' sum and no more. Under sampled client-level DP it also tosses
its own coin for joining the round, seen by no one else."""

from __future__ import annotations

import numpy as np

from fl_llm.client.rng import platform_rng
from fl_llm.config import RunConfig
from fl_llm.tensors import AdapterState, flatten


class SecAggParty:
    def __init__(self, platform_id: int, cfg: RunConfig):
        self.id, self.cfg = platform_id, cfg
        self._client = None  # this round's protocol state (keys, shares received)

    def advertise(self, round_: int, threshold: int) -> dict:
        """Step 0: fresh key pairs for this round; returns the two public keys."""
        from fl_llm.privacy.secagg import SecAggClient

        self._client = SecAggClient(self.id, round_, threshold)
        return self._client.advertise()

    def _round(self):
        if self._client is None:  # e.g. this process was restarted after the key exchange
            raise RuntimeError(f"platform {self.id}: no secure-aggregation keys for this round")
        return self._client

    def share(self, keys: dict) -> dict:
        """Step 1: {peer: encrypted Shamir shares of this platform's mask secrets}."""
        return self._round().share(keys)

    def joins(self, sample_rate: float, round_: int, attempt: int) -> bool:
        """Sampled client-level DP under secure aggregation: this platform's own coin, from the OS
        (or the run seed when privacy.dp.secure_rng=false), seen by no one else."""
        if sample_rate >= 1.0:
            return True
        from fl_llm.privacy.csprng import dp_generator

        coin = dp_generator(self.cfg.privacy.dp.secure_rng, [self.cfg.seed, round_, self.id % 2**32, attempt, 5])
        return bool(coin.random() < sample_rate)

    def levels(self, update: AdapterState, round_: int, sa: dict, joined: bool = True):
        """(the signed fixed-point levels this platform sends for `update`, the integers appended
        to them, the share of values clipped to the ring's range). Under client-level DP the update
        is clipped to norm C, quantized, and the quantized vector bounded to norm C again; the
        appended integer is its centred clip bit (0 when it did not join the round)."""
        from fl_llm.privacy.dp import centred_bit
        from fl_llm.privacy.secagg import Ring

        vec = flatten([update])[0][0] * float(sa["weight"])
        if not np.isfinite(vec).all():  # the ring would turn NaN into 0 and Inf into the range's edge
            raise ValueError(f"platform {self.id}: the update has NaN/Inf values; not sent into the secure sum")
        clip = sa.get("clip")
        extra = []
        if clip is not None:
            norm = float(np.linalg.norm(vec))
            vec = vec * min(1.0, clip / (norm + 1e-12))
            extra = [centred_bit(norm, clip) if joined else 0]
        ring = Ring(*sa["ring"])
        rng = platform_rng(self.cfg.seed, round_, self.id, 3)
        if clip is not None:  # what is sent, not only the update, must be within C
            levels, _, clipped = ring.quantize_within(vec, rng, clip)
        else:
            levels, clipped = ring.quantize(vec, rng)
        limit = self.cfg.privacy.secagg.max_clipped
        if clipped > limit:
            raise ValueError(
                f"platform {self.id}: {clipped:.1%} of the update's values lie beyond ±privacy.secagg.clip_range "
                f"({ring.clip_range:g}), more than privacy.secagg.max_clipped ({limit:.1%}); not sent into the secure sum"
            )
        return levels, extra, clipped

    def masked_upload(self, update: AdapterState, round_: int, sa: dict, joined: bool = True) -> dict:
        """Step 2: the update weighted, clipped (client-level DP: to norm C, bounded after
        quantizing, and the centred bit appended for adaptive clipping), quantized into the ring
        and masked."""
        from fl_llm.privacy.secagg import Ring

        ring = Ring(*sa["ring"])
        levels, extra, clipped = self.levels(update, round_, sa, joined)
        vector = ring.to_ring(np.concatenate([levels, np.asarray(extra, np.int64)]))
        masked = self._round().mask(vector, sa["inbox"], ring)
        return {"masked": masked, "bytes": int(masked.nbytes), "secagg_clipped": clipped}

    def reveal(self, survivors: list[int], dropped: list[int]) -> dict:
        """Step 3: the shares that let the driver unmask the sum of the survivors, and no more."""
        return self._round().reveal(survivors, dropped)
