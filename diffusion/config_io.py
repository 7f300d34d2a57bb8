"""Run config files: YAML / JSON read safely, sections merged, `section.key=value` overrides.

Every file goes through `unets.guards` (a regular UTF-8 file of at most 1 MiB). YAML is read
with a safe loader (no object construction) after its event stream is checked: nesting at
most `unets.guards.MAX_DEPTH` deep and at most `MAX_NODES` values once aliases are expanded
(an alias bomb is small on disk and huge in memory; PyYAML's composer recurses, so deep
nesting would end in a `RecursionError`). JSON is depth-checked before `json.loads`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from diffusion.config import DEPRECATED_TOP, TOP_KEYS, ConfigError, normalise, unknown_key_message
from unets import guards

__all__ = ["apply_overrides", "load_config_file", "merge", "parse_override", "read_config_text", "yaml_load"]

MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 100_000  # values in a config file after YAML aliases are expanded


# ---------------------------------------------------------------------------------------
# reading text safely

# YAML 1.1 (PyYAML) reads `3e-4` as a string: its floats need a dot. Learning rates are
# written that way, so the loader also takes YAML 1.2 / JSON style exponents.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml ships with the train extra
        raise ImportError("reading YAML configs needs PyYAML: pip install 'spacetime-video[train]'") from err

    class Loader(yaml.SafeLoader):
        """yaml.SafeLoader (no object construction) that also reads `1e-4` as a float."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))
    return Loader


def _check_yaml_shape(text: str, what: str) -> None:
    """Refuse YAML nested deeper than `guards.MAX_DEPTH` or holding more than `MAX_NODES`
    values once aliases are expanded, reading only the event stream (PyYAML's parser is
    iterative; its composer and constructor recurse, and an alias bomb is small on disk but
    huge once expanded). An anchor's expanded size and depth are remembered, so each alias
    costs one lookup."""
    import yaml

    stack: list[list[int]] = []  # per open collection: [expanded nodes, deepest child depth, anchor?]
    anchors: dict[str, tuple[int, int]] = {}
    total = 0

    def add(nodes: int, depth: int) -> None:
        nonlocal total
        if stack:
            stack[-1][0] += nodes
            stack[-1][1] = max(stack[-1][1], depth)
        total += nodes
        if total > MAX_NODES:
            raise guards.BadFileError(f"{what} holds more than {MAX_NODES:,} values (YAML aliases expanded)")

    opened: list[str | None] = []
    for event in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([0, 0])
            opened.append(event.anchor)
            if len(stack) > guards.MAX_DEPTH:
                raise guards.BadFileError(f"{what} nests deeper than {guards.MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            nodes, depth = stack.pop()
            anchor = opened.pop()
            size, height = nodes + 1, depth + 1
            if anchor is not None:
                anchors[anchor] = (size, height)
            # The children were counted into `total` as they came; only this node is new.
            if stack:
                stack[-1][0] += size
                stack[-1][1] = max(stack[-1][1], height)
            total += 1
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchors[event.anchor] = (1, 0)
            add(1, 0)
        elif isinstance(event, yaml.AliasEvent):
            size, height = anchors.get(event.anchor, (1, 0))
            if len(stack) + height > guards.MAX_DEPTH:
                raise guards.BadFileError(f"{what} nests deeper than {guards.MAX_DEPTH} levels (YAML aliases expanded)")
            add(size, height)
        if total > MAX_NODES:
            raise guards.BadFileError(f"{what} holds more than {MAX_NODES:,} values (YAML aliases expanded)")


def yaml_load(text: str, what: str = "YAML text") -> Any:
    """Parse YAML with a safe loader after bounding its depth and expanded size."""
    import yaml

    try:
        _check_yaml_shape(text, what)
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(err).split())}") from None


def read_config_text(text: str, *, suffix: str, what: str) -> Any:
    """Parse config text as JSON (`suffix` .json) or YAML, bounded in depth and size."""
    if suffix == ".json":
        guards.check_depth(text, what=what)
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{what} is not valid JSON: {err}") from None
    if suffix in (".yaml", ".yml"):
        return yaml_load(text, what)
    raise ConfigError(f"{what}: a config file must end in .yaml, .yml or .json")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON run configuration (a regular UTF-8 file of at most 1 MiB, safe
    loaders only, depth and aliases bounded) and check its top-level layout."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"config file must end in .yaml, .yml or .json, got {str(path)!r}")
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = guards.read_text(path, what="config file", max_bytes=MAX_CONFIG_BYTES)
    data = read_config_text(text, suffix=suffix, what=f"config file {str(path)!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections {', '.join(TOP_KEYS)}, "
            f"got a {type(data).__name__}"
        )
    return normalise(data)


# ---------------------------------------------------------------------------------------
# merging and overrides


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`, section by section (keys of a section in
    `override` replace those in `base`; other keys are kept). A `data` section of another
    `kind` replaces the whole section."""
    import copy

    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key == "data" and isinstance(value, dict) and isinstance(out.get(key), dict) \
                and value.get("kind", out[key].get("kind")) != out[key].get("kind"):
            out[key] = copy.deepcopy(value)  # another kind of data: the old kind's keys mean nothing
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.train_lr=3e-4` -> (['trainer', 'train_lr'], 3e-4). Values are read as YAML
    (numbers, booleans, null, [1, 2], {a: 1}); text YAML cannot read stays a string."""
    if "=" not in text:
        raise ConfigError(f"an override must look like section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if not path:
        raise ConfigError(f"an override must name a key before '=', got {text!r}")
    try:
        value = yaml_load(raw, f"the value of override {dotted.strip()}")
    except guards.BadFileError as err:
        raise ConfigError(str(err)) from None
    except ConfigError:
        value = raw  # a value YAML cannot read is taken as the literal string
    return path, value


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` (or `unet=NAME`, `unet_preset=NAME`) overrides in order."""
    out = merge(normalise(config), {})
    for text in overrides:
        path, value = parse_override(text)
        head = DEPRECATED_TOP.get(path[0], path[0])
        if head not in TOP_KEYS:
            raise ConfigError(f"in override {text!r}: " + unknown_key_message("config", path[0], TOP_KEYS))
        if len(path) == 1:
            out[head] = value
        elif len(path) == 2:
            if head in ("unet", "unet_preset"):
                raise ConfigError(f"{head!r} is a value, not a section: write {head}=NAME, got {text!r}")
            out = merge(out, {head: {path[1]: value}})
        else:
            raise ConfigError(f"overrides go at most two levels deep (section.key=value), got {text!r}")
    return normalise(out)
