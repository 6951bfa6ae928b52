"""Data-parallel training with FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

    torchrun --nproc_per_node 2 -m llama.train --config configs/train/NAME.yaml

`setup()` reads the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and starts the process group: gloo on the CPU, nccl on CUDA (each rank on
cuda:LOCAL_RANK). Without them, or with WORLD_SIZE=1, nothing is started and the run is a plain
single-process one.

`shard_model(model)` shards every transformer block, then the rest (embeddings, final norm,
output head) in a root group that wraps the model together with the loss (`LossModule`), so that
the fused linear + cross-entropy reads the gathered head weight inside a sharded forward.
Parameters become DTensors holding this rank's shard; the optimizer (llama.optim.AdamW) updates
the local shards, and gradients are averaged over the ranks by FSDP's reduce-scatter.

The global batch (`batch_size`) is split across the ranks: every rank draws the same batch from
an identically seeded loader and trains on its own contiguous rows, so the mean loss over the
ranks is the loss a single process would compute on that batch, and the checkpoints of any world
size hold the same data position. Checkpoints are sharded (torch.distributed.checkpoint) and load
at any world size, a single process included.
"""
from __future__ import annotations

import datetime
import os
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["LossModule", "all_reduce_mean", "any_rank", "barrier", "full_tensor", "is_distributed", "is_sharded",
           "launched", "local_rows", "rank", "rank_from_env", "setup", "shard_like", "shard_model", "teardown",
           "world_size", "world_size_from_env"]

_MESH = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer (as torchrun sets it), got {value!r}") from None


def world_size_from_env() -> int:
    """The number of ranks torchrun started (1 for a single process)."""
    return _env_int("WORLD_SIZE", 1)


def launched() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return world_size_from_env() > 1


def setup(device: torch.device) -> torch.device:
    """Start the process group when launched by torchrun with several ranks; returns this rank's
    device (cuda:LOCAL_RANK on CUDA, else `device`). A no-op for a single process."""
    global _MESH
    if not launched() or is_distributed():
        return device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"{name}: not set; launch distributed runs with torchrun --nproc_per_node N")
    local = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"device: {device} is not supported for distributed training (cpu or cuda)")
    if backend == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("device: cpu needs the gloo backend, which this PyTorch build lacks")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    _MESH = init_device_mesh(device.type, (dist.get_world_size(),))
    return device


def rank_from_env() -> int:
    """This process's rank as torchrun set it (0 for a single process); valid after teardown."""
    return _env_int("RANK", 0) if launched() else 0


def teardown() -> None:
    """Destroy the process group started by `setup` (a no-op otherwise)."""
    global _MESH
    if is_distributed():
        dist.destroy_process_group()
    _MESH = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean of `value` over the ranks (the value itself for a single process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (so that all ranks stop at the same step)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def local_rows(batch_size: int) -> slice:
    """This rank's contiguous rows of a global batch of `batch_size` rows."""
    n = world_size()
    if batch_size % n:
        raise ValueError(f"batch_size: {batch_size} is not divisible by the number of ranks ({n}); the global "
                         "batch is split evenly across them")
    per = batch_size // n
    return slice(rank() * per, (rank() + 1) * per)


# ----------------------------------------------------------------------------- sharding
def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor, else `t`."""
    return t.to_local() if is_sharded(t) else t


class LossModule(nn.Module):
    """The model and a loss function as one module, the root of the sharding: inside its forward
    the root group's parameters (embeddings, final norm, output head) are gathered, so the loss
    may read `model.output.weight` as a plain tensor. forward(fn, *args) returns fn(*args)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> LossModule:
    """Apply fully_shard to each transformer block of `model`, then to a LossModule around it (the
    root); returns that root. `model`'s parameters become DTensors, their names unchanged."""
    if not is_distributed():
        raise RuntimeError("shard_model: no process group; call setup() under torchrun first")
    from torch.distributed.fsdp import fully_shard

    # A block returns (h, branch), views among them; nothing changes them in place (the next block
    # and the final norm add out of place), so FSDP's warning about in-place ops on views is moot.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in getattr(model, "layers", ()):
        fully_shard(block, mesh=_MESH, reshard_after_forward=reshard_after_forward)
    root = LossModule(model)
    fully_shard(root, mesh=_MESH, reshard_after_forward=reshard_after_forward)
    return root


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor, the same on every rank) laid out as `like` (a DTensor or not)."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def mesh() -> Optional[Any]:
    return _MESH
