"""AdamW applied inside backward: each parameter is updated, and its gradient freed, as soon
as its gradient is complete, so a step never holds every gradient at once.

A fine-tuning step of a large video U-Net holds, at the end of backward, a gradient for every
trainable weight: for ModelScope 1.7B's 545M temporal weights that is 2 GB of the step, as
much as all the activations kept for backward. The technique (PyTorch's "optimizer step in
backward" recipe, `Tensor.register_post_accumulate_grad_hook`) runs each parameter's update in
the hook that fires once its gradient has been accumulated, then drops the gradient; the
gradients alive at any moment are those of the parameters whose backward is in progress.

`AdamWInBackward` *is* a `torch.optim.AdamW` over all the parameters (its `param_groups`,
`state`, `state_dict()` and `load_state_dict()` are AdamW's own, so a checkpoint written with
it loads into a plain AdamW and back). A parameter's first update is made by a one-parameter
AdamW that shares the whole optimizer's state (so AdamW creates that state itself); later ones
call PyTorch's functional AdamW (its fused kernel where there is one) on that state
(`_adamw_update`), with the
group's hyperparameters (the learning rate the trainer sets each step) read when it runs. Same
update as `AdamW.step()`, only at another time.

What it cannot do, because no hook sees every gradient before the first update:
- global-norm gradient clipping (the norm is known only after the last update); the norm is
  still measured, unclipped (`FusedStepReport.grad_norm`);
- gradient accumulation over micro-batches (the first backward would already update);
- fp16 loss scaling (an overflow is found only after some parameters were updated);
- DDP / FSDP (the hook fires before the gradient is all-reduced).
`diffusion.config.TrainerConfig` and the trainer refuse these combinations.

A NaN or infinite gradient is caught in the hook before that parameter's update: from that
parameter on, nothing more is updated in the step (the gradients are dropped), and
`FusedStepReport.non_finite` names it. Parameters whose hooks ran earlier in the same backward
were already updated with finite gradients, so the weights in memory are no longer the previous
step's; the trainer therefore stops without saving (the last checkpoint is intact). Checking
costs one host sync per parameter on a GPU (none on a CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as adamw_functional

# The hyperparameters AdamW's constructor takes (a group also holds derived ones).
_ADAMW_OPTIONS = tuple(inspect.signature(torch.optim.AdamW.__init__).parameters)[2:]


@dataclasses.dataclass(frozen=True)
class FusedStepReport:
    """What one backward with updates inside did.

    grad_norm: the global 2-norm of all gradients seen (unclipped; the same number
        `torch.nn.utils.clip_grad_norm_` returns for them, up to rounding);
    updated: how many parameters were updated; skipped: how many gradients were dropped
        without an update after a non-finite one;
    non_finite: the name (or position) of the first parameter whose gradient was NaN / inf,
        None when all were finite."""

    grad_norm: float
    updated: int
    skipped: int
    non_finite: str | None = None


class AdamWInBackward(torch.optim.AdamW):
    """`torch.optim.AdamW` whose per-parameter updates run during backward (module doc).

    Updates happen only inside `with optimizer.backward_steps():`; a backward outside it
    accumulates gradients as usual, and `step()` is AdamW's, so code that steps the optimizer
    itself (checkpoint helpers initialising state) keeps working. `names` (optional, in the
    order of the parameters) label the parameter in `FusedStepReport.non_finite`."""

    def __init__(self, params: Iterable[Any], *, names: Sequence[str] | None = None, **adamw_options: Any):
        super().__init__(params, **adamw_options)
        flat = [p for group in self.param_groups for p in group["params"]]
        if names is not None and len(names) != len(flat):
            raise ValueError(f"names must name each of the {len(flat)} parameters, got {len(names)} names")
        # Per parameter: its group's index (groups are replaced by load_state_dict, so they
        # are looked up when needed), its label, and the one-parameter AdamW that updates it.
        self._single: dict[int, tuple[int, str, torch.optim.AdamW]] = {}
        self._handles = []
        for index, group in enumerate(self.param_groups):
            hyper = {k: group[k] for k in _ADAMW_OPTIONS if k in group}
            for p in group["params"]:
                label = names[len(self._single)] if names is not None else f"parameter {len(self._single)}"
                self._single[id(p)] = (index, label, torch.optim.AdamW([p], **hyper))
                self._handles.append(p.register_post_accumulate_grad_hook(self._update))
        self._armed = False
        self._reset()

    def _reset(self) -> None:
        self._norms: list[Tensor] = []
        self._done: set[int] = set()
        self._updated = self._skipped = 0
        self._non_finite: str | None = None

    @contextlib.contextmanager
    def backward_steps(self) -> Iterator[None]:
        """Run the backward passes of one step inside: each parameter is updated, and its
        gradient freed, as its gradient completes. Gradients left from before are dropped."""
        if self._armed:
            raise RuntimeError("backward_steps() is already active: one step at a time")
        self.zero_grad(set_to_none=True)
        self._reset()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def report(self) -> FusedStepReport:
        """The last `backward_steps()` block's gradient norm, counts and non-finite parameter."""
        norm = float(torch.linalg.vector_norm(torch.stack(self._norms))) if self._norms else 0.0
        return FusedStepReport(grad_norm=norm, updated=self._updated, skipped=self._skipped,
                               non_finite=self._non_finite)

    @torch.no_grad()
    def _update(self, param: Tensor) -> None:
        if not self._armed:
            return
        key = id(param)
        if key in self._done:
            # A second accumulation in one step (a reentrant checkpoint whose inner backward
            # accumulates apart from the outer one): the first update used a partial gradient.
            raise RuntimeError(
                f"{self._single[key][1]} received its gradient twice in one backward: the update inside "
                "backward needs each gradient accumulated once (use non-reentrant gradient checkpointing, "
                "use_reentrant=False, or turn trainer.optimizer_in_backward off)")
        self._done.add(key)
        grad = param.grad
        # Measured in fp32 without a squared copy of the gradient.
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        self._norms.append(norm)
        index, label, single = self._single[key]
        if self._non_finite is None and not math.isfinite(float(norm)):
            self._non_finite = label
        if self._non_finite is not None:
            self._skipped += 1
        else:
            group = self.param_groups[index]
            state = self.state.get(param)
            if state and _plain_adamw(group, param, state):
                _adamw_update(param, grad, state, group)
            else:
                # The first update (AdamW creates the state it keeps) and options the direct
                # functional call does not cover go through a one-parameter AdamW.
                single.param_groups[0].update((k, v) for k, v in group.items() if k != "params")
                # The whole optimizer's state (also what load_state_dict replaced it with).
                single.state = self.state
                single.step()
            self._updated += 1
        param.grad = None

    def remove_hooks(self) -> None:
        """Detach the hooks from the parameters (the optimizer then behaves as plain AdamW)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _plain_adamw(group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> bool:
    """Whether `_adamw_update` makes this parameter's AdamW step: the trainer's options (no
    amsgrad, maximize, capturable, differentiable or fused kernels; float hyperparameters), a
    real parameter, and the step count AdamW keeps as a tensor."""
    return (not group["amsgrad"] and not group["maximize"] and not group["capturable"]
            and not group["differentiable"] and not group["fused"] and group.get("decoupled_weight_decay", True)
            and all(isinstance(v, (float, int)) for v in (group["lr"], *group["betas"], group["weight_decay"]))
            and not torch.is_complex(param) and torch.is_tensor(state.get("step")))


# Where and for which dtypes PyTorch ships the fused AdamW kernel `_adamw_update` uses.
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _adamw_update(param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One AdamW step of one parameter through PyTorch's functional AdamW (decoupled weight
    decay; it counts the step itself). Called directly because stepping a one-parameter
    optimizer costs tens of microseconds of Python per parameter (a tenth of a tiny U-Net's
    train step). Where PyTorch ships the fused kernel (the one `AdamW(fused=True)` runs) it is
    used: one pass over the parameter, its gradient and both moments instead of about six; on a
    545M-parameter temporal stack on a CPU thread ~0.3 s a step instead of ~3.8 s, equal to the
    plain update within float rounding (tests/test_fused_step.py)."""
    beta1, beta2 = group["betas"]
    fused = param.device.type in _FUSED_DEVICES and param.dtype in _FUSED_DTYPES
    adamw_functional([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
                     foreach=False, fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def fused_adamw(model: nn.Module, params: Sequence[nn.Parameter], **adamw_options: Any) -> AdamWInBackward:
    """`AdamWInBackward` over `params`, labelled with their names in `model`."""
    names = {id(p): name for name, p in model.named_parameters()}
    return AdamWInBackward(params, names=[names.get(id(p), f"parameter {i}") for i, p in enumerate(params)],
                           **adamw_options)


def check_trainer_support(*, loss_scaling: bool, world_size: int) -> None:
    """Refuse, naming both settings, what only the trainer knows once it runs: fp16 loss
    scaling (`amp` on a GPU without bf16) and more than one process (DDP / FSDP)."""
    on = "trainer.optimizer_in_backward=true"
    if loss_scaling:
        raise ValueError(
            f"{on} cannot run with fp16 loss scaling (trainer.amp=true on a device without bf16): an overflow is "
            "found only after some weights were updated; use a bf16-capable device, trainer.amp=false, or turn "
            "trainer.optimizer_in_backward off")
    if world_size > 1:
        raise ValueError(
            f"{on} cannot run on {world_size} processes (trainer.parallel resolved to DDP/FSDP): the update would "
            "run before the gradient is all-reduced; train on one process or turn trainer.optimizer_in_backward off")
