"""Fault injection: rehearse failures black-box, from the config (`faults.*`). Never for production.

    faults:
      kill:    [{platform: 1, round: 3}]              # its actor process exits mid-training
                                                      # (worker: 1 — that worker of a platform's group)
      error:   [{platform: 1, round: 4}]              # its training raises an exception
      delay:   [{platform: 2, seconds: 30, rounds: [5]}]  # it sleeps before training (a straggler)
      corrupt: [{platform: 0, rounds: [2], kind: nan}]  # nan | inf | shape | keys | scale | noise

Kills and errors fire on a round's first attempt only, so a retried round can succeed; a delay
is a slow machine and applies to every attempt. The platform calls these functions; the driver
knows nothing of them and sees only what a real failure would show it.
"""

from __future__ import annotations

import os
import time

import numpy as np

from fl_llm.config import FaultsConfig

KILL_EXIT_CODE = 17  # what an injected kill makes the actor process exit with


class InjectedError(RuntimeError):
    """An exception thrown on purpose inside training (`faults.error`)."""


class InjectedKill(RuntimeError):
    """Stands for a process exit where the platform must not really exit (the local backend)."""


def should_kill(faults: FaultsConfig, platform: int, round_: int, attempt: int, worker: int = 0) -> bool:
    return attempt == 0 and any(
        f.platform == platform and f.round == round_ and f.worker == worker for f in faults.kill
    )


def should_error(faults: FaultsConfig, platform: int, round_: int, attempt: int, worker: int = 0) -> bool:
    return attempt == 0 and any(
        f.platform == platform and f.round == round_ and f.worker == worker for f in faults.error
    )


def delay_seconds(faults: FaultsConfig, platform: int, round_: int) -> float:
    return sum(f.seconds for f in faults.delay if f.platform == platform and (not f.rounds or round_ in f.rounds))


def corruption(faults: FaultsConfig, platform: int, round_: int):
    """The corruption to apply this round (kind and factor), or None."""
    for f in faults.corrupt:
        if f.platform == platform and (not f.rounds or round_ in f.rounds):
            return f
    return None


def corrupt(update: dict[str, np.ndarray], kind: str, factor: float = 100.0, seed: int = 0) -> dict[str, np.ndarray]:
    """A copy of `update` damaged the way a buggy or malicious platform might damage it:
    `scale` multiplies it by `factor`; `noise` replaces it by Gaussian noise `factor` times its
    norm (a model-poisoning platform); the others break its form."""
    out = {k: np.array(v, copy=True) for k, v in update.items()}
    first = sorted(out)[0]
    if kind == "nan":
        out[first].reshape(-1)[0] = np.nan
    elif kind == "inf":
        out[first].reshape(-1)[0] = np.inf
    elif kind == "shape":
        out[first] = np.zeros(out[first].shape[:-1] + (out[first].shape[-1] + 1,), dtype=out[first].dtype)
    elif kind == "keys":
        out["not_a_parameter.weight"] = out.pop(first)
    elif kind == "scale":
        out = {k: v * np.float32(factor) for k, v in out.items()}
    elif kind == "noise":
        rng = np.random.default_rng([seed, 0xBAD])
        norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values())))
        size = sum(v.size for v in out.values())
        sd = factor * norm / np.sqrt(max(size, 1))
        out = {k: rng.normal(0.0, sd, size=v.shape).astype(v.dtype) for k, v in sorted(out.items())}
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return out


def delay_before_training(faults: FaultsConfig, platform: int, round_: int, deadline: float | None, late_error) -> None:
    """An injected delay: sleep like a slow machine, but not past the round's deadline (then
    raise `late_error`)."""
    delay = delay_seconds(faults, platform, round_)
    if delay <= 0:
        return
    wake = time.monotonic() + delay
    while (now := time.monotonic()) < wake:
        if deadline is not None and now > deadline:
            raise late_error(f"round {round_}: past the deadline while delayed")
        time.sleep(min(0.05, wake - now))


def step_hook(faults: FaultsConfig, platform: int, round_: int, attempt: int, hard_exit: bool, worker: int = 0):
    """Called after the first local step: where injected kills and errors strike mid-training.
    `hard_exit`: a kill ends the process (a Ray actor); else it raises `InjectedKill`. `worker`:
    which of the platform's workers this is (a fault strikes the one it names)."""
    kill = should_kill(faults, platform, round_, attempt, worker)
    error = should_error(faults, platform, round_, attempt, worker)
    if not (kill or error):
        return None

    def hook(step: int) -> None:
        if kill:
            if hard_exit:
                os._exit(KILL_EXIT_CODE)  # no cleanup, no exception: like a lost node
            raise InjectedKill(f"platform {platform}: injected kill in round {round_}")
        raise InjectedError(f"platform {platform}: injected error in round {round_}")

    return hook
