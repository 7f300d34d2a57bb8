"""State-dict layouts of the U-Nets by version, and the key maps that carry an old layout to
the current one (docs/design.md "Checkpoints").

A U-Net whose parameter names change gets a new layout version: `KEY_MAPS[name][v]` holds the
rules taking layout `v` to `v + 1`, so the current version is one past the last entry (1 for a
U-Net that never changed). Each rule renames keys (relative to the U-Net) that match its
pattern and may reshape the tensor. Rules only match names that no later layout uses, so an
upgrade applied to a state dict that is already current changes nothing: a file that does
not say its version (a trainer checkpoint, a user's `state_dict()`) is read by applying every
map. `unets.io.save_pretrained` records the version in the safetensors metadata; a file from a
newer layout than this library knows is refused.

Versions:
    unet3d 1   its own resnet block (`emb_proj.1`, `block1.proj`, a 1x1x1 `nn.Conv3d` residual)
    unet3d 2   the shared `unets.blocks.ResnetBlock` (`emb_proj`, `block1.project`, the residual
               a 1x1 "conv3d" block: `res_conv.spatial`, weight without the time axis)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from torch import Tensor, nn

__all__ = [
    "KEY_MAPS",
    "METADATA_KEY",
    "KeyRule",
    "layout_version",
    "upgrade_key",
    "upgrade_module_state",
    "upgrade_optimizer_state",
    "upgrade_state_dict",
]

# Name of the safetensors metadata entry holding the layout version (a decimal string).
METADATA_KEY = "state_dict_version"


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """Keys matching `pattern` (in full, relative to the U-Net) become `replacement` (with
    `re` group references); `reshape`, if set, maps the old tensor to the new shape."""

    pattern: str
    replacement: str
    reshape: Callable[[Tensor], Tensor] | None = None

    def apply(self, key: str) -> str | None:
        """The new key, or None when `key` does not match."""
        match = re.fullmatch(self.pattern, key)
        return None if match is None else match.expand(self.replacement)


def _drop_time_axis(weight: Tensor) -> Tensor:
    # (out, in, 1, 1, 1) of a 1x1x1 Conv3d -> (out, in, 1, 1) of the per-frame Conv2d: the same map.
    return weight.squeeze(2) if weight.ndim == 5 else weight


# Unet3D's resnet blocks: two per stage, two in the middle, one at the end.
_UNET3D_RESNET = r"(?P<block>(?:downs|ups)\.\d+\.block[12]|mid_block[12]|final_block)"

KEY_MAPS: dict[str, dict[int, tuple[KeyRule, ...]]] = {
    "unet3d": {
        1: (
            KeyRule(_UNET3D_RESNET + r"\.emb_proj\.1\.(?P<p>weight|bias)", r"\g<block>.emb_proj.\g<p>"),
            KeyRule(_UNET3D_RESNET + r"\.(?P<half>block[12])\.proj\.(?P<rest>(?:spatial|temporal)\.(?:weight|bias))",
                    r"\g<block>.\g<half>.project.\g<rest>"),
            KeyRule(_UNET3D_RESNET + r"\.res_conv\.weight", r"\g<block>.res_conv.spatial.weight", _drop_time_axis),
            KeyRule(_UNET3D_RESNET + r"\.res_conv\.bias", r"\g<block>.res_conv.spatial.bias"),
        ),
    },
}


def _name(model: nn.Module | str) -> str | None:
    if isinstance(model, str):
        return model
    config = getattr(model, "config", None)
    return getattr(config, "unet_name", None)


def layout_version(model: nn.Module | str) -> int:
    """The current state-dict layout version of a U-Net (instance or registry name)."""
    maps = KEY_MAPS.get(_name(model) or "", {})
    return max(maps, default=0) + 1


def _rules(name: str, from_version: int | None) -> list[tuple[int, KeyRule]]:
    current = layout_version(name)
    start = 1 if from_version is None else from_version
    if not isinstance(start, int) or isinstance(start, bool) or start < 1:
        raise ValueError(f"state-dict version must be an int >= 1 or None, got {from_version!r}")
    if start > current:
        raise ValueError(
            f"weights in {name} state-dict layout version {start}, but this library reads versions up to "
            f"{current}: they were saved by a newer version of it"
        )
    maps = KEY_MAPS.get(name, {})
    return [(v, rule) for v in range(start, current) for rule in maps.get(v, ())]


def upgrade_key(name: str, key: str, from_version: int | None = None) -> tuple[str, list[KeyRule]]:
    """`key` (relative to the U-Net `name`) in the current layout, and the rules that moved it."""
    applied = []
    for _, rule in _rules(name, from_version):
        new = rule.apply(key)
        if new is not None:
            key = new
            applied.append(rule)
    return key, applied


def upgrade_state_dict(
    model: nn.Module | str,
    state_dict: Mapping[str, Tensor],
    from_version: int | None = None,
    *,
    prefix: str = "",
) -> dict[str, Tensor]:
    """A copy of `state_dict` with the keys under `prefix` that belong to the U-Net `model`
    carried from layout `from_version` (None: not known, apply every map) to the current
    one. Other keys are kept as they are. Two old keys landing on one new key raise."""
    name = _name(model)
    out: dict[str, Tensor] = {}
    moved_from: dict[str, str] = {}
    rules = _rules(name, from_version) if name is not None else []
    for key, value in state_dict.items():
        new_key = key
        if rules and key.startswith(prefix):
            new_key, applied = upgrade_key(name, key[len(prefix):], from_version)
            new_key = prefix + new_key
            for rule in applied:
                if rule.reshape is not None:
                    value = rule.reshape(value)
        if new_key in out:
            raise ValueError(
                f"state dict has both {moved_from.get(new_key, new_key)!r} and {key!r}, which are the same "
                f"weight {new_key!r} of {name} in two layouts"
            )
        out[new_key] = value
        moved_from[new_key] = key
    return out


def upgrade_in_place(module: nn.Module, state_dict: MutableMapping[str, Tensor], prefix: str) -> None:
    """Rewrite `state_dict` (as `load_state_dict` passes it to a pre-hook) to the current
    layout of `module` under `prefix`; a no-op for keys already current."""
    upgraded = upgrade_state_dict(module, state_dict, prefix=prefix)
    if list(upgraded) != list(state_dict):
        state_dict.clear()
        state_dict.update(upgraded)


def load_state_dict_pre_hook(module: nn.Module, state_dict: MutableMapping[str, Tensor], prefix: str,
                             *args: object) -> None:
    """For `nn.Module.register_load_state_dict_pre_hook`: lets `load_state_dict` (trainer
    checkpoints, EMA copies, a user's saved `state_dict()`) read every older layout."""
    upgrade_in_place(module, state_dict, prefix)


def _unets_in(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(prefix, module)` of every sub-module of `root` (itself included) with a key map."""
    return [(f"{name}." if name else "", module) for name, module in root.named_modules()
            if KEY_MAPS.get(_name(module) or "")]


def upgrade_module_state(root: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` of `root` with the keys of every U-Net inside it (itself included)
    carried to the current layout; for loaders that never call `load_state_dict`'s hooks
    (`torch.distributed.checkpoint.state_dict.set_model_state_dict` looks keys up first)."""
    out = dict(state_dict)
    for prefix, module in _unets_in(root):
        out = upgrade_state_dict(module, out, prefix=prefix)
    return out


def upgrade_optimizer_state(root: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (`torch.distributed.checkpoint.state_dict.
    get_optimizer_state_dict`'s format: `{"state": {name: {...}}, "param_groups": [{"params":
    [name, ...], ...}]}`) with the names of every U-Net inside `root` carried to its current
    layout, and per-parameter tensors shaped like the old parameter reshaped alike (Adam's
    moments), so a training run resumes exactly from a checkpoint of an older layout."""
    renames: dict[str, str] = {}
    reshapes: dict[str, list[KeyRule]] = {}
    names = set(state.get("state", {})) | {n for g in state.get("param_groups", []) for n in g.get("params", [])}
    for prefix, module in _unets_in(root):
        for full in names:
            if isinstance(full, str) and full.startswith(prefix):
                new, applied = upgrade_key(_name(module), full[len(prefix):])
                if applied:
                    renames[full] = prefix + new
                    reshapes[full] = [r for r in applied if r.reshape is not None]
    if not renames:
        return dict(state)

    def moved(name: str, value: Any) -> Any:
        for rule in reshapes.get(name, ()):
            value = {k: rule.reshape(v) if isinstance(v, Tensor) and v.ndim > 0 else v for k, v in value.items()}
        return value

    out = dict(state)
    out["state"] = {renames.get(k, k): moved(k, v) for k, v in state.get("state", {}).items()}
    out["param_groups"] = [{**g, "params": [renames.get(n, n) for n in g.get("params", [])]}
                           for g in state.get("param_groups", [])]
    return out
