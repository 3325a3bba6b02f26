"""What a platform keeps between rounds and keeps from the driver: `KeptState` is mixed into
`Platform`. Training stages state (SCAFFOLD's cᵢ, FedSA's own B, DP-AdamBC's moments, top-k's
residual); `commit` keeps it once the driver accepts the update; `save_state` / `load_state`
write and read it in the platform's own state directory, which the driver never reads; under DP
`_release` holds back what would reveal its training records, into its own log."""

from __future__ import annotations

import re
from pathlib import Path


def safe_name(name: str) -> str:
    """A platform's name as one safe path component (its state directory)."""
    cleaned = re.sub(r"[^\w.-]", "_", name)
    return "_" if cleaned in ("", ".", "..") else cleaned


def state_dir_of(template: str, name: str) -> Path:
    """A platform's own state directory: client.state_dir with `{name}` as its safe name."""
    return Path(template.replace("{name}", safe_name(name)))


class KeptState:
    """State methods of `Platform` (see there for the attributes they read)."""

    @property
    def private_log(self) -> Path | None:
        """This platform's own log of what it keeps from the driver under DP."""
        return self.state_dir / "metrics.jsonl" if self.state_dir else None

    def _release(self, answer: dict, round_: int, call: str) -> dict:
        from fl_llm.privacy.release import release

        return release(answer, self.cfg.privacy.dp.level, self.private_log, round_, call)

    def commit(self, round_: int) -> bool:
        """The driver accepted this platform's update of `round_`: the state staged while training
        it (SCAFFOLD's cᵢ, FedSA's own B, DP-AdamBC's moments, top-k's residual) becomes the state
        kept between rounds. An update that was rejected, late or part of a failed attempt is
        never committed; the next training starts from the state as it was."""
        if self.staged_round != round_:
            return False
        self.persistent.update(self.staged)
        self.staged, self.staged_round = {}, None
        return True

    def save_state(self, round_: int, keep: int = 2) -> bool:
        """Write the state kept between rounds as of the end of `round_` into this platform's state
        directory (the driver calls this at each checkpoint; it never reads the files)."""
        if self.state_dir is None:
            return False
        from fl_llm import checkpoint

        checkpoint.save(self.state_dir / "checkpoints", round_, {"persistent": self.persistent}, keep=keep)
        return True

    def load_state(self, round_: int) -> int:
        """Take up the state saved at the newest checkpoint at or before `round_` (the driver's
        checkpoint being resumed); fresh state when there is none. Returns the round loaded (0: none)."""
        from fl_llm import checkpoint

        self.persistent, got = {}, 0
        saved = None
        if self.state_dir is not None and self.worker == 0:  # rank 0's node keeps the state
            saved, _ = checkpoint.latest_intact(self.state_dir / "checkpoints", at_most=round_)
        if saved is not None:
            got, state = checkpoint.load(saved, verified=True)
            self.persistent = state["persistent"]
        if self.group is not None:  # every worker of the platform trains from the same state
            got, self.persistent = self.group.from_rank0((got, self.persistent))
        return got
