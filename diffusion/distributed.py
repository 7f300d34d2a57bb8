"""Data-parallel training: torchrun detection, process groups, DDP / FSDP2 wrapping.

The Trainer runs unchanged with or without `torchrun`. Under torchrun (the environment
variables `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` are set) it calls
`setup()`, which joins the process group (gloo on CPU, nccl on CUDA) and pins each process
to the GPU of its local rank; without them everything here is a no-op for one process.

Conventions the Trainer builds on (see its docstring for the rest):
- `train_batch_size` is the global batch of one micro-step; each rank takes a contiguous
  slice of `train_batch_size // world_size` samples of it, so the same command line trains
  the same model whatever the number of processes.
- Rank 0 writes every file (checkpoints, metrics, samples) and logs; the other ranks log
  warnings and errors only. Collective calls (`broadcast_error`, `sync_control`) keep a failure or a stop
  request on one rank from leaving the others waiting in the next all-reduce.
- FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters, gradients and optimizer
  state; checkpoints are gathered to full tensors on rank 0, so they have the same format
  as single-process and DDP ones and resume under any world size and either wrapper.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: `rank` of `world_size`, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun (torch.distributed.run) environment variables are all set."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _quiet_other_ranks(rank: int) -> None:
    """Ranks other than 0 log warnings and errors only, so N processes do not print N
    copies of every progress message. (A level, not a filter: a logger's filters do not
    see the records its child loggers propagate to it.) Warnings stay: a file one rank
    fails to decode is seen by that rank alone."""
    if rank == 0:
        return
    for name in ("diffusion", "unets", "spacetime"):
        package = logging.getLogger(name)
        package.setLevel(max(package.getEffectiveLevel(), logging.WARNING))


def setup(device: torch.device | str | None = None, *, timeout_s: float = 1800.0) -> DistributedContext:
    """Join (or reuse) the process group and choose this rank's device.

    - A process group initialised by the caller is used as it is.
    - Under torchrun one is initialised here: nccl when the device is CUDA, gloo otherwise;
      it is destroyed at interpreter exit.
    - Otherwise this is one process: `device` is returned unchanged.

    With CUDA under more than one process, `device` "cuda" (or None with a GPU present)
    becomes `cuda:<LOCAL_RANK>`."""
    requested = torch.device(device) if device is not None else None
    if not dist.is_available() or (not dist.is_initialized() and not launched_by_torchrun()):
        return DistributedContext(device=requested or torch.device("cpu"))

    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if requested is None:
        requested = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if requested.type == "cuda":
        if requested.index is not None and requested.index != local_rank:
            logger.warning("device %s replaced by cuda:%d: one GPU per local rank under torchrun", requested, local_rank)
        requested = torch.device("cuda", local_rank)
        torch.cuda.set_device(requested)

    if not dist.is_initialized():
        world_size = _env_int("WORLD_SIZE")
        if world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
        backend = "nccl" if requested.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = requested
        dist.init_process_group(**kwargs)
        atexit.register(_destroy)
        logger.info("joined process group: rank %d of %d (%s) on %s", dist.get_rank(), world_size, backend, requested)
    context = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, requested)
    _quiet_other_ranks(context.rank)
    return context


# How long a rank waits at exit for the others before leaving anyway.
_EXIT_BARRIER_S = 60


def _destroy() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        # Leave together: a gloo rank that tears its process group down while a peer is still
        # finishing its last collective can make that peer abort at exit ("terminate called
        # without an active exception"), so a finished run would end with a failed rank. The
        # monitored barrier gives up after a while instead of waiting on a rank that crashed.
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=_EXIT_BARRIER_S))
        except RuntimeError as error:
            logger.warning("leaving the process group without the other ranks: %s", str(error).splitlines()[0])
    dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that joined a gloo process group with exit status `code`: leave the
    group together with the other ranks (as at exit), flush, and stop at once, skipping the
    interpreter's teardown, where gloo's threads can still abort a rank whose work is done and
    saved ("terminate called without an active exception", seen under a loaded machine even
    after the exit barrier). Returns without doing anything in any other process, whose
    caller then exits normally. For `__main__` entry points only: nothing after it runs."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"):
        return
    _destroy()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def resolve_parallel(parallel: str, context: DistributedContext) -> str:
    """The wrapper to use: 'none' for one process, 'ddp' for `auto` with several."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if not context.enabled:
        if parallel in ("ddp", "fsdp"):
            logger.info("parallel=%r ignored: this is a single process (start with torchrun for more)", parallel)
        return "none"
    return "ddp" if parallel == "auto" else parallel


# ---------------------------------------------------------------------------------------
# wrapping


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards as separate units (each all-gathered just before it runs):
    the entries of every `nn.ModuleList` in the model (a U-Net's down / mid / up blocks),
    outermost lists only. Parameters outside them belong to the root unit."""
    units: list[nn.Module] = []
    claimed: set[int] = set()
    for module in model.modules():
        if id(module) in claimed or not isinstance(module, nn.ModuleList):
            continue
        for entry in module:
            if any(True for _ in entry.parameters()):
                units.append(entry)
            claimed.update(id(m) for m in entry.modules())
    return units


def fully_shard_model(model: nn.Module, **options: Any) -> nn.Module:
    """Apply FSDP2 `fully_shard` to `shard_units(model)` and then the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(model):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def wrap_ddp(model: nn.Module, context: DistributedContext, *, find_unused_parameters: bool = True) -> nn.Module:
    """DistributedDataParallel around `model`; parameters are broadcast from rank 0 here."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # Unused parameters are the rule here, not a bug: image batches skip temporal layers and
    # an unconditional batch skips the condition projection.
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward passes accumulate gradients locally without communicating
    (`no_sync` for DDP, `set_requires_gradient_sync(False)` for FSDP2) unless `enabled`.
    Used for every micro-batch but the last of a gradient-accumulation step."""
    if enabled:
        yield
        return
    if hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
        return
    yield


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place updates reach the DTensor); any
    other tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def full_value(tensor: Tensor) -> Tensor:
    """The whole value of a (possibly sharded or partial) DTensor, on every rank."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


# ---------------------------------------------------------------------------------------
# collectives the Trainer needs beyond gradients


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    """Sum a few floats over ranks (float64, on the rank's device for nccl)."""
    if not context.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_object(value: Any, context: DistributedContext, src: int = 0) -> Any:
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=context.device if context.device.type == "cuda" else None)
    return box[0]


class RemoteError(RuntimeError):
    """Raised on every rank when the operation failed on the rank that performed it."""


def broadcast_error(error: BaseException | None, context: DistributedContext, src: int = 0) -> None:
    """After an operation run on rank `src` only (a checkpoint write): re-raise its error
    there and raise a `RemoteError` with the same message on the other ranks, so no rank is
    left waiting for a partner that has given up."""
    if not context.enabled:
        if error is not None:
            raise error
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    message = broadcast_object(message, context, src=src)
    if error is not None:
        raise error
    if message is not None:
        raise RemoteError(f"rank {src} failed: {message}")


def prepare_model(model: nn.Module, ema_model: nn.Module, parallel: str, context: DistributedContext, *,
                  find_unused_parameters: bool = True) -> tuple[nn.Module, nn.Module | None]:
    """`(train_model, sampling_copy)`: the module a training step calls (DDP-wrapped under
    "ddp", the model itself otherwise) and, under "fsdp", an unsharded CPU copy on rank 0
    for sample grids (None elsewhere). With "fsdp" the model and its EMA are sharded in place."""
    if parallel == "ddp":
        return wrap_ddp(model, context, find_unused_parameters=find_unused_parameters), None
    if parallel != "fsdp":
        return model, None
    from diffusion.ema import frozen_copy

    copy = frozen_copy(model).to("cpu") if context.is_main else None
    fully_shard_model(model)
    fully_shard_model(ema_model)
    return model, copy


# ---------------------------------------------------------------------------------------
# full (unsharded) state for checkpoints


def full_state_dicts(model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
                     *, sharded: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Model, EMA and optimizer state as full tensors; under FSDP (`sharded`) a collective
    call that leaves them on rank 0 only (empty elsewhere). The optimizer state is keyed by
    parameter name, the same for sharded and plain models."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    if sharded:
        model_state = get_model_state_dict(model, options=options)
        ema_state = get_model_state_dict(ema_model, options=options)
    else:
        model_state, ema_state = model.state_dict(), ema_model.state_dict()
    return model_state, ema_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
                    weights: tuple[dict[str, Tensor], dict[str, Tensor]], optimizer_state: dict[str, Any],
                    *, version: int, sharded: bool, strict: bool = True) -> None:
    """The inverse of `full_state_dicts` (every rank holds the full tensors read from disk);
    `version` 1 optimizer state is keyed by position."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from unets.upgrade import upgrade_module_state, upgrade_optimizer_state

    # Weights and optimizer state of an older U-Net parameter layout (unets.upgrade).
    model_state, ema_state = (upgrade_module_state(m, w) for m, w in zip((model, ema_model), weights))
    if sharded:
        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(model, model_state, options=options)
        set_model_state_dict(ema_model, ema_state, options=options)
    else:
        model.load_state_dict(model_state, strict=strict)
        ema_model.load_state_dict(ema_state, strict=strict)
    if version == 1:
        optimizer.load_state_dict(optimizer_state)
    else:
        optimizer_state = upgrade_optimizer_state(model, optimizer_state)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=sharded))
