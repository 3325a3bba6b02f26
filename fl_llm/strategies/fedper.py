"""FedPer: share the body, keep each platform's classification head — personalised classifiers.

Paper: Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv:1912.00818,
2019.

For `model.kind=seq_cls` the adapter holds the LoRA factors and the new classification head
(the tensors that are not LoRA factors). The factors are averaged as in FedAvg; the head never
leaves its platform, so each platform keeps its own decision layer — its own label balance and
threshold — on top of a shared reading of the text. Linear in what it aggregates. A causal LM's
adapter has no head, so there it would be FedAvg under another name: refused.
"""

from __future__ import annotations

from fl_llm.errors import UserError
from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.strategies.lora import is_a, is_b


class FedPer(Strategy):
    def personal(self, key: str) -> bool:
        """Each platform's own head: every adapter tensor that is not a LoRA factor."""
        return not (is_a(key) or is_b(key))

    @property
    def one_global_model(self) -> bool:
        return False  # each platform saves its own adapter: the shared factors, its own head

    def check(self, cfg, cohort: int) -> None:
        super().check(cfg, cohort)
        if cfg.model.kind != "seq_cls":
            raise UserError(
                f"strategy.name=fedper keeps each platform's classification head, but model.kind="
                f"{cfg.model.kind} has none (its adapter is LoRA factors only, so fedper would be fedavg); "
                "use model.kind=seq_cls, or strategy.name=fedsa for personal models of a causal LM"
            )


STRATEGY = FedPer(
    "fedper",
    "Arivazhagan et al., Federated Learning with Personalization Layers (FedPer), arXiv 2019",
    "LoRA factors averaged, the classification head kept on each platform: personalised classifiers",
    FEDAVG,
)
