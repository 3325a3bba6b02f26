"""Strategy registry: `strategy.name` picks one; each algorithm lives in its own file, named
after its paper, as a pure function over numpy adapter tensors. `step.aggregate_round` runs one
round of whichever is chosen; `fl-llm strategies` lists them with their papers and parameters."""

from fl_llm.strategies.base import Strategy, weighted_mean

_ADAPTIVE = ("server_lr", "beta1", "tau")
_ROBUST_COMBINABLE = ("robust",)

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        # --- server optimizers on the pseudo-gradient Δ --------------------------------------------
        Strategy(
            "fedavg",
            "McMahan et al., AISTATS 2017; server lr: Reddi et al., ICLR 2021",
            "example-weighted mean of the updates, x <- x + η·Δ",
            ("server_lr", *_ROBUST_COMBINABLE),
        ),
        Strategy(
            "fedavgm",
            "Hsu et al., 2019 (arXiv:1909.06335)",
            "FedAvg with server momentum: v <- βv + Δ, x <- x + η·v",
            ("server_lr", "momentum", *_ROBUST_COMBINABLE),
            server="fedavgm",
        ),
        Strategy(
            "fedadagrad",
            "Reddi et al., Adaptive Federated Optimization, ICLR 2021",
            "Adagrad on Δ at the server",
            (*_ADAPTIVE, *_ROBUST_COMBINABLE),
            server="fedadagrad",
            default_lr=0.1,
        ),
        Strategy(
            "fedadam",
            "Reddi et al., Adaptive Federated Optimization, ICLR 2021",
            "Adam on Δ at the server",
            (*_ADAPTIVE, "beta2", *_ROBUST_COMBINABLE),
            server="fedadam",
            default_lr=0.01,
        ),
        Strategy(
            "fedyogi",
            "Reddi et al., Adaptive Federated Optimization, ICLR 2021",
            "Yogi on Δ at the server (additive second moment)",
            (*_ADAPTIVE, "beta2", *_ROBUST_COMBINABLE),
            server="fedyogi",
            default_lr=0.01,
        ),
        # --- client-side corrections ---------------------------------------------------------------
        Strategy(
            "fedprox",
            "Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020",
            "platforms add (μ/2)‖w − x‖² to their loss; FedAvg at the server",
            ("mu", "server_lr", *_ROBUST_COMBINABLE),
            client="prox",
        ),
        Strategy(
            "scaffold",
            "Karimireddy et al., SCAFFOLD, ICML 2020",
            "control variates correct client drift (needs client.optimizer=sgd; doubles the upload)",
            ("server_lr",),
            client="scaffold",
        ),
        # --- LoRA-aware aggregation ----------------------------------------------------------------
        Strategy(
            "fedit",
            "Zhang et al., Towards Building the Federated GPT, ICASSP 2024",
            "naive: average A and B separately (not exact; the baseline)",
            ("server_lr", *_ROBUST_COMBINABLE),
        ),
        Strategy(
            "ffa",
            "Sun et al., Improving LoRA in Privacy-preserving FL (FFA-LoRA), ICLR 2024",
            "A frozen at its shared init, only B trained and averaged: exact, half the bytes",
            ("server_lr", *_ROBUST_COMBINABLE),
            lora="ffa",
        ),
        Strategy(
            "fedex",
            "Singhal et al., FedEx-LoRA, ACL 2025",
            "average A and B, fold the residual Σpᵢ(Bᵢ−B̄)(Aᵢ−Ā) into the base weights: exact",
            (),
            lora="fedex",
        ),
        Strategy(
            "flora",
            "Wang et al., FLoRA, NeurIPS 2024",
            "stack the factors, merge Σpᵢ BᵢAᵢ into the base, fresh LoRA each round: exact, any ranks",
            (),
            lora="flora",
        ),
        Strategy(
            "fedsa",
            "Guo et al., Selective Aggregation for LoRA in FL (FedSA-LoRA), ICLR 2025",
            "A averaged, B kept on each platform: personalised models",
            ("server_lr",),
            lora="fedsa",
        ),
        # --- robust combination (FedAvg server step; strategy.robust combines them with others) ---
        Strategy(
            "norm_bound",
            "Sun et al., Can You Really Backdoor Federated Learning?, 2019",
            "clip each update to norm C, then the weighted mean",
            ("clip_norm", "server_lr"),
            robust="norm_bound",
        ),
        Strategy(
            "median",
            "Yin et al., Byzantine-Robust Distributed Learning, ICML 2018",
            "coordinate-wise median of the updates",
            ("server_lr",),
            robust="median",
        ),
        Strategy(
            "trimmed_mean",
            "Yin et al., Byzantine-Robust Distributed Learning, ICML 2018",
            "coordinate-wise mean without the β fraction at each end",
            ("trim_fraction", "server_lr"),
            robust="trimmed_mean",
        ),
        Strategy(
            "krum",
            "Blanchard et al., NeurIPS 2017 (Krum); El Mhamdi et al., ICML 2018 (Multi-Krum)",
            "average the m updates closest to their n − f − 2 nearest neighbours",
            ("krum_byzantine", "krum_select", "server_lr"),
            robust="krum",
        ),
    )
}

__all__ = ["STRATEGIES", "Strategy", "weighted_mean"]
