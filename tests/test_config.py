"""Run configuration: file loading, overrides and validation (diffusion/config.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffusion.config import (
    ConfigError,
    apply_overrides,
    check_kwargs,
    load_config_file,
    merge,
    parse_override,
    validate_config,
)
from diffusion.presets import DEMO_CAPTIONS, available_presets, get_preset


def debug_config(**sections):
    return merge(get_preset("debug"), sections)


# --- files -------------------------------------------------------------------------------


def test_load_yaml_and_json_give_the_same_config(tmp_path):
    config = {"unet": "unet3d", "model": {"dim": 8, "dim_mults": [1, 2]}, "trainer": {"train_lr": 3e-4}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    (tmp_path / "run.yaml").write_text(
        "unet: unet3d\nmodel:\n  dim: 8\n  dim_mults: [1, 2]\ntrainer:\n  train_lr: 3.0e-4\n"
    )
    assert load_config_file(tmp_path / "run.json") == config
    assert load_config_file(tmp_path / "run.yaml") == config


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("run.toml", "unet = 1", "must end in .yaml"),
        ("run.yaml", "unet: [unclosed", "not valid YAML"),
        ("run.json", "{", "not valid JSON"),
        ("run.yaml", "- a\n- b\n", "must hold a mapping"),
        ("run.yaml", "trainers: {}\n", "unknown config key 'trainers' \\(did you mean 'trainer'\\?\\)"),
        ("run.yaml", "trainer: 3\n", "config section 'trainer' must be a mapping, got 3"),
    ],
)
def test_bad_files_raise_one_config_error(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")


def test_yaml_cannot_construct_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("trainer: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(path)


# --- overrides ---------------------------------------------------------------------------


def test_overrides_parse_values_and_merge_sections():
    config = apply_overrides(
        {"trainer": {"train_lr": 1e-4, "train_batch_size": 4}},
        ["trainer.train_lr=3e-4", "sample.captions=[a, b]", "diffusion.objective=v", "preset=small", "model.cond_dim=null"],
    )
    assert config["trainer"] == {"train_lr": 3e-4, "train_batch_size": 4}
    assert config["sample"] == {"captions": ["a", "b"]}
    assert config["diffusion"] == {"objective": "v"}
    assert config["preset"] == "small"
    assert config["model"] == {"cond_dim": None}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("trainer.train_lr", "must look like section.key=value"),
        ("=3", "must name a key"),
        ("trainer.a.b=1", "at most two levels"),
        ("optim.lr=1", "unknown config key 'optim'"),
        ("unet.dim=3", "is a value, not a section"),
    ],
)
def test_bad_overrides(text, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides({}, [text])


@given(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans()))
def test_override_values_round_trip(value):
    path, parsed = parse_override(f"trainer.x={json.dumps(value)}")
    assert path == ["trainer", "x"]
    assert parsed == value and type(parsed) is type(value)


def test_merge_does_not_alias_its_inputs():
    base = {"trainer": {"a": 1}, "sample": {"captions": ["x"]}}
    merged = merge(base, {"trainer": {"b": 2}})
    merged["sample"]["captions"].append("y")
    assert base == {"trainer": {"a": 1}, "sample": {"captions": ["x"]}}
    assert merged["trainer"] == {"a": 1, "b": 2}


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_validates(name):
    config = validate_config(get_preset(name))
    assert config["model"]["channels"] == config["diffusion"]["channels"]
    assert config["data"]["kind"] == "moving-digits"


def test_demo_captions_cover_every_digit_and_direction():
    from diffusion.moving_digits import DIRECTION_NAMES, parse_caption

    parsed = [parse_caption(c) for c in DEMO_CAPTIONS]
    assert len(DEMO_CAPTIONS) == 16 == len(set(DEMO_CAPTIONS))
    assert {d for d, _ in parsed} == set(range(10))
    assert {k for _, k in parsed} == set(DIRECTION_NAMES)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ({"trainer": {"train_lr_": 1e-3}}, ["trainer", "'train_lr_'", "did you mean 'train_lr'"]),
        ({"model": {"dimm": 8}}, ["model", "'dimm'", "did you mean 'dim'"]),
        ({"diffusion": {"objectiv": "v"}}, ["diffusion", "'objectiv'"]),
        ({"data": {"num_video": 3}}, ["data", "'num_video'", "did you mean 'num_videos'"]),
        ({"sample": {"cond_scales": 2}}, ["sample", "'cond_scales'"]),
        ({"trainer": {"train_lr": "fast"}}, ["trainer.train_lr", "'fast'", "must be a number"]),
        ({"trainer": {"train_batch_size": 2.5}}, ["trainer.train_batch_size", "2.5", "must be an int"]),
        ({"trainer": {"amp": "yes"}}, ["trainer.amp", "'yes'", "must be a bool"]),
        ({"trainer": {"train_num_steps": -5}}, ["trainer.train_num_steps", "-5", "> 0"]),
        ({"trainer": {"max_seconds": -1}}, ["trainer.max_seconds", "-1", ">= 0"]),
        ({"trainer": {"ema_decay": 1.5}}, ["trainer.ema_decay", "1.5", "[0, 1]"]),
        ({"diffusion": {"num_frames": 0}}, ["diffusion.num_frames", "0", "> 0"]),
        ({"diffusion": {"image_size": 10}}, ["diffusion.image_size", "10", "multiple of 4", "size_multiple"]),
        ({"diffusion": {"objective": "eps"}}, ["diffusion.objective", "'eps'", "noise, x0, v"]),
        ({"diffusion": {"timesteps": float("nan")}}, ["diffusion.timesteps", "nan"]),
        ({"model": {"channels": 3}}, ["model.channels=3", "diffusion.channels=1"]),
        ({"data": {"kind": "mnist"}}, ["data.kind", "'mnist'", "moving-digits, folder"]),
        ({"data": {"digit_size": 40}}, ["data.digit_size", "40", "between 4"]),
        ({"sample": {"sampler": "euler"}}, ["sample.sampler", "'euler'", "ddpm, ddim"]),
        ({"sample": {"captions": ["ok", ""]}}, ["sample.captions", "non-empty strings"]),
        ({"unet": "unet4d"}, ["'unet4d'", "space_time_unet", "unet3d"]),
        ({"preset": "huge"}, ["'huge'", "debug"]),
    ],
)
def test_invalid_values_give_one_clear_message(override, fragments):
    with pytest.raises(ConfigError) as info:
        validate_config(debug_config(**override))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_frames_must_fit_the_unets_time_compression():
    config = debug_config(model={"temporal_compression": [False, True]}, diffusion={"num_frames": 3})
    with pytest.raises(ConfigError, match=r"diffusion.num_frames must be a multiple of 2 .*got 3"):
        validate_config(config)


def test_folder_data_needs_a_folder():
    config = debug_config()
    config["data"] = {"kind": "folder"}
    with pytest.raises(ConfigError, match="data.folder is required"):
        validate_config(config)
    config["data"] = {"kind": "folder", "folder": "videos", "frame_mode": "crop"}
    assert validate_config(config)["data"]["folder"] == "videos"


def test_required_video_keys():
    config = debug_config()
    del config["diffusion"]["image_size"]
    with pytest.raises(ConfigError, match="diffusion.image_size is required"):
        validate_config(config)


def test_check_kwargs_against_a_signature():
    def target(a: int = 1, *, b: float = 0.5, c=None):
        return a, b, c

    check_kwargs("s", {"a": 2, "b": 1, "c": "anything"}, target)
    with pytest.raises(ConfigError, match=r"unknown s key 'd'; allowed keys: a, b, c"):
        check_kwargs("s", {"d": 1}, target)
    with pytest.raises(ConfigError, match=r"s.a must be an int, got True"):
        check_kwargs("s", {"a": True}, target)
