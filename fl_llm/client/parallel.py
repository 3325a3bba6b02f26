"""A platform bigger than one device: its workers training together with torch.distributed.

With `ray.workers_per_platform = N` a platform is N processes (the backend places them; no Ray
here), joined in one process group — NCCL on GPUs, gloo on CPUs — that only its own workers are
in. Every local step's batch is drawn once, on rank 0, and split over the workers; their
gradients are summed, so the step is the one a single worker takes on the whole batch (up to the
order of floating-point sums). `client.parallel`:

- ddp: every worker holds the whole base; the adapter's gradients are all-reduced in one flat
  buffer per step (the semantics of DistributedDataParallel, without its buckets: LoRA's
  gradients are a few MB);
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer and on the model: the
  frozen base and the adapter are sharded over the workers, gathered layer by layer for the
  forward and backward passes, the adapter's gradients reduce-scattered. The adapter is gathered
  whole for the upload (`full_tensor`), and only the adapter leaves the platform, as always.

Record-level DP clips per example on each worker and adds the noise once per platform step, on
rank 0 (`fl_llm.privacy.dp.private_gradient`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np


@dataclass
class Group:
    """This worker's place in its platform's process group."""

    rank: int
    world: int
    mode: str  # ddp | fsdp
    device: Any

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This worker's part of a step's batch (every world-th example from its rank)."""
        return idx[self.rank :: self.world]

    def from_rank0(self, obj):
        """Rank 0's `obj` on every worker (e.g. the round's batches, drawn once)."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def total(self, values: list[float]) -> list[float]:
        """Each value summed over the workers."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether any worker's flag is set: a decision they all take together (to stop)."""
        return self.total([float(bool(flag))])[0] > 0

    def gather(self, obj) -> list:
        """Every worker's `obj`, by rank."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_tensors(self, tensors: list) -> list:
        """The tensors summed over the workers, in one flat all-reduce."""
        import torch
        import torch.distributed as dist

        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        out, at = [], 0
        for t in tensors:
            out.append(flat[at : at + t.numel()].reshape(t.shape).to(t.dtype))
            at += t.numel()
        return out

    def reduce_gradients(self, params: list) -> None:
        """DDP: each parameter's gradient becomes the sum of the workers' (FSDP reduces its own)."""
        import torch

        if self.sharded:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, g in zip(params, self.sum_tensors(grads)):
            p.grad = g

    def loss_scale(self) -> float:
        """What each worker's share of the loss is multiplied by so the gradient is the sum:
        FSDP2 averages the workers' gradients; our DDP all-reduce sums them."""
        return float(self.world) if self.sharded else 1.0


def join(rendezvous: dict, rank: int, world: int, mode: str, device, timeout_s: float = 1800.0) -> Group:
    """Join the platform's process group. `rendezvous`: {"file": path} on one machine (a private
    local instance: nothing listens on a port) or {"host", "port"} — rank 0's TCP store. A peer
    that dies makes the others' next collective fail at once (the connection resets); one that
    hangs, after `timeout_s`."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return Group(rank, world, mode, device)
    timeout = timedelta(seconds=timeout_s)
    if "file" in rendezvous:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())  # gloo's own sockets too
        store = dist.FileStore(rendezvous["file"], world)
    else:
        store = dist.TCPStore(rendezvous["host"], int(rendezvous["port"]), world, False, timeout=timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Group(rank, world, mode, device)


def tcp_store(host: str, world: int, timeout_s: float = 1800.0):
    """Rank 0's TCP store on a free port of `host` (a cluster: the workers may be on several nodes).
    Returns (store, port); keep the store alive as long as the group."""
    import torch.distributed as dist

    store = dist.TCPStore(host, 0, world, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return store, store.port


def loopback_interface() -> str:
    """The name of the loopback interface (gloo binds its sockets to the one it is given)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(getattr(a, "address", "") == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def shard_model(model, group: Group) -> None:
    """FSDP2 over the platform's workers: each decoder layer its own unit (gathered in turn), the
    rest (embeddings, tied head, final norm, a classifier's head) the base model's, the root."""
    from torch.distributed.fsdp import fully_shard

    from fl_llm.model.adapters import base_of

    base = base_of(model)
    for layer in decoder_layers(base):
        fully_shard(layer)
    fully_shard(base)  # the root: its forward runs whenever the model's does (and in generate)


def decoder_layers(base) -> list:
    """The transformer blocks of a Hugging Face causal LM or classifier."""
    import torch

    for module in base.modules():
        layers = getattr(module, "layers", None) or getattr(module, "layer", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise ValueError(f"client.parallel=fsdp: no ModuleList of decoder layers found in {type(base).__name__}")


def unshard_root(model):
    """A context that holds the FSDP root's parameters (embeddings, head) gathered, for a forward
    and backward pass that call the base's submodules rather than the base (the packed path)."""
    import contextlib

    from fl_llm.model.adapters import base_of

    model = base_of(model)
    if not hasattr(model, "unshard"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered():
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    return gathered()


def no_grad(model):
    """No autograd for an evaluation pass: inference mode, except on a sharded model, whose
    gathered parameters must stay ordinary tensors for the next training step."""
    import torch

    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def is_sharded(model) -> bool:
    """Whether FSDP has sharded the model's parameters over the platform's workers."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def full(t):
    """A parameter or gradient as one whole tensor (a sharded DTensor is gathered: a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(param, value):
    """`value` (a whole tensor) laid out as `param` is: sharded the same way for a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        local = param.to_local()
        # every worker holds the same whole value: each keeps its own shard, nothing is sent
        return distribute_tensor(
            value.to(local.device, local.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    return value.to(param.device, param.dtype)


def resident_parameter_bytes(model) -> int:
    """Bytes of parameters this worker holds (its shards under FSDP)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return int(total)


def worker_figures(metrics: dict, device, seconds: float) -> dict:
    """One worker's share of a platform's training round, for metrics.jsonl."""
    import socket

    tokens = metrics.get("worker_tokens", metrics.get("tokens", 0))
    return {
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "device": str(device),
        "tokens": tokens,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "peak_memory_bytes": metrics["peak_memory_bytes"],
    }
