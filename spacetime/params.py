"""Split a model's parameters by whether they mix information across frames.

A module that mixes across frames (a temporal conv, temporal attention and its position
bias, a temporal down/upsampler) is *marked* temporal where it is created. Every parameter
that lives under a marked module is temporal; every other one is spatial. This lets users
pretrain on images, freeze the spatial part and train only the temporal part, including on
third-party U-Nets that `inflate()` has extended.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

_TEMPORAL_ATTR = "_spacetime_temporal"


def mark_temporal(module: nn.Module) -> nn.Module:
    """Mark `module` (and so everything under it) as mixing across frames; returns it."""
    setattr(module, _TEMPORAL_ATTR, True)
    return module


def is_temporal(module: nn.Module) -> bool:
    return bool(getattr(module, _TEMPORAL_ATTR, False))


def _temporal_ids(module: nn.Module) -> set[int]:
    ids: set[int] = set()
    for sub in module.modules():
        if is_temporal(sub):
            ids.update(id(p) for p in sub.parameters())
    return ids


def temporal_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of `module` that mix information across frames (each once)."""
    temporal = _temporal_ids(module)
    for p in module.parameters():
        if id(p) in temporal:
            yield p


def spatial_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter of `module` not yielded by `temporal_parameters` (each once)."""
    temporal = _temporal_ids(module)
    for p in module.parameters():
        if id(p) not in temporal:
            yield p
