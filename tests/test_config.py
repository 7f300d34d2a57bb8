"""Run configuration: file loading, overrides and validation (diffusion/config.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffusion.config import ConfigError, validate_config
from diffusion.config_io import apply_overrides, load_config_file, merge, parse_override
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
        ["trainer.train_lr=3e-4", "sample.captions=[a, b]", "diffusion.objective=v", "unet_preset=small",
         "model.cond_dim=null"],
    )
    assert config["trainer"] == {"train_lr": 3e-4, "train_batch_size": 4}
    assert config["sample"] == {"captions": ["a", "b"]}
    assert config["diffusion"] == {"objective": "v"}
    assert config["unet_preset"] == "small"
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
        ({"trainer": {"train_num_steps": -5}}, ["trainer.train_num_steps", "-5", ">= 0"]),
        ({"trainer": {"max_seconds": -1}}, ["trainer.max_seconds", "-1", "[0, inf]"]),
        ({"trainer": {"ema_decay": 1.5}}, ["trainer.ema_decay", "1.5", "[0, 1]"]),
        ({"diffusion": {"num_frames": 0}}, ["diffusion.num_frames", "0", ">= 1"]),
        ({"diffusion": {"image_size": 10}}, ["diffusion.image_size", "10", "multiple of 4", "size_multiple"]),
        ({"diffusion": {"objective": "eps"}}, ["diffusion.objective", "'eps'", "'noise', 'x0', 'v'"]),
        ({"diffusion": {"timesteps": float("nan")}}, ["diffusion.timesteps", "nan"]),
        ({"model": {"channels": 3}}, ["model.channels=3", "diffusion.channels=1"]),
        ({"data": {"kind": "mnist"}}, ["data.kind", "'mnist'", "'moving-digits', 'folder'"]),
        ({"data": {"digit_size": 40}}, ["data.digit_size", "40", "between 4"]),
        ({"sample": {"sampler": "fastest"}}, ["sample.sampler", "'fastest'", "'ddpm', 'ddim'"]),
        ({"sample": {"captions": ["ok", ""]}}, ["sample.captions", "non-empty strings"]),
        ({"unet": "unet4d"}, ["'unet4d'", "space_time_unet", "unet3d"]),
        ({"unet_preset": "huge"}, ["unet_preset", "'huge'", "debug"]),
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


# --- typed sections ----------------------------------------------------------------------

from diffusion.config import (  # noqa: E402
    DataConfig,
    DiffusionConfig,
    RunConfig,
    SampleConfig,
    TrainerConfig,
    check_sample_kwargs,
)
from diffusion.config_io import MAX_NODES, yaml_load  # noqa: E402
from diffusion.run import RESUME_HONOURED, resume_conflicts  # noqa: E402


def test_trainer_config_has_the_trainers_options_and_defaults():
    import inspect

    from diffusion.trainer import Trainer

    fields = {f: getattr(TrainerConfig(), f) for f in TrainerConfig.__dataclass_fields__}
    assert fields["max_seconds"] == 0.0 and fields["save_model_every"] is None
    parameters = inspect.signature(Trainer.__init__).parameters
    explicit = {n: p.default for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    if not explicit:  # a Trainer that takes **options builds a TrainerConfig itself
        pytest.skip("the Trainer takes its options through TrainerConfig")
    for name in ("diffusion_model", "folder", "dataset", "device", "resume", "progress"):
        explicit.pop(name, None)
    for name, default in explicit.items():
        assert name in fields, name
        expected = list(default) if isinstance(default, tuple) else default
        got = list(fields[name]) if isinstance(fields[name], tuple) else fields[name]
        assert got == expected, name


def test_one_rule_per_trainer_option():
    # The rules that drifted between the command line and the Trainer, resolved once.
    assert TrainerConfig(train_num_steps=0).train_num_steps == 0  # zero steps: load, sample, save
    assert TrainerConfig(train_lr=1).train_lr == 1  # an int is a number
    assert DiffusionConfig(image_size=8, num_frames=2, dynamic_thres_percentile=1.0).dynamic_thres_percentile == 1.0
    with pytest.raises(ConfigError, match=r"diffusion.dynamic_thres_percentile must lie in \(0, 1\], got 0"):
        DiffusionConfig(image_size=8, num_frames=2, dynamic_thres_percentile=0)
    with pytest.raises(ConfigError, match=r"trainer.image_ratio must lie in \[0, 1\), got 1"):
        TrainerConfig(image_ratio=1)
    with pytest.raises(TypeError, match="trainer.amp must be a bool"):  # a ConfigError and a TypeError
        TrainerConfig(amp=1)
    with pytest.raises(ConfigError, match=r"trainer.seed must be an int <= 9223372036854775807"):
        TrainerConfig(seed=2**70)
    with pytest.raises(ConfigError, match=r"trainer.adam_betas\[1\] must lie in \[0, 1\)"):
        TrainerConfig(adam_betas=[0.9, 1.0])
    with pytest.raises(ConfigError, match=r"trainer.lr_schedule must be one of 'constant', 'cosine', 'linear'"):
        TrainerConfig(lr_schedule="cosin")
    with pytest.raises(ConfigError, match=r"trainer.parallel must be one of .*'fsdp'"):
        TrainerConfig(parallel="zero")


def test_sections_refuse_unknown_keys_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown sample key 'sampler_' \(did you mean 'sampler'\?\)"):
        SampleConfig.from_dict({"sampler_": "ddim"})
    with pytest.raises(ConfigError, match=r"data.folder is not a key of data.kind='moving-digits'"):
        DataConfig.from_dict({"folder": "x"})
    with pytest.raises(ConfigError, match=r"unknown config key 'trainr' \(did you mean 'trainer'\?\)"):
        RunConfig.from_dict({**get_preset("debug"), "trainr": {}})


def test_sample_kwargs_are_checked_against_their_target_and_the_schedule():
    def sample(cond=None, cond_scale=1.0, batch_size=16, *, sampler="ddpm", steps=None, eta=0.0):
        return None

    check_sample_kwargs("k", {"sampler": "ddim", "steps": 3}, target=sample, timesteps=3)
    with pytest.raises(ConfigError, match=r"unknown k key 'foo'; allowed keys: eta, sampler, steps"):
        check_sample_kwargs("k", {"foo": 1}, target=sample)
    with pytest.raises(ConfigError, match=r"k.steps must be an int <= 2, got 3"):
        check_sample_kwargs("k", {"steps": 3}, timesteps=2)
    with pytest.raises(ConfigError, match=r"k.batch_size is set by the trainer"):
        check_sample_kwargs("k", {"batch_size": 3})
    with pytest.raises(ConfigError, match=r"trainer.sample_kwargs.steps must be an int <= 20"):
        validate_config(debug_config(trainer={"sample_kwargs": {"steps": 50}}))
    with pytest.raises(ConfigError, match=r"sample.steps must be at most diffusion.timesteps=20, got 50"):
        validate_config(debug_config(sample={"steps": 50}))


def test_old_spellings_are_read_with_a_warning():
    old = get_preset("debug")
    old["preset"] = old.pop("unet_preset")
    old["diffusion"]["cond_on_tokens"] = True
    with pytest.warns(FutureWarning) as caught:
        config = RunConfig.from_dict(old)
    messages = " ".join(str(w.message) for w in caught)
    assert "'preset' is now 'unet_preset'" in messages and "cond_on_tokens" in messages
    assert config.unet.preset == "debug"
    with pytest.raises(ConfigError, match="both 'preset'"):
        RunConfig.from_dict({**old, "unet_preset": "debug"})


def test_text2video_from_scratch_layout():
    seed = {
        "training_data_dir": "./training_data",
        "model": {"dim": 8, "use_bert_text_cond": True, "dim_mults": [1, 2], "init_dim": None,
                  "init_kernel_size": 7, "use_sparse_linear_attn": True},
        "diffusion": {"image_size": 16, "num_frames": 5, "timesteps": 10, "loss_type": "l1",
                      "use_dynamic_thres": False, "dynamic_thres_percentile": 0.9},
        "trainer": {"ema_decay": 0.995, "train_batch_size": 2, "save_model_every": 10,
                    "results_folder": "./saved_models", "max_grad_norm": None},
    }
    config = RunConfig.from_dict(seed)
    assert config.unet.name == "unet3d"
    assert config.data.to_dict() == {"kind": "folder", "folder": "./training_data"}
    assert config.trainer.save_model_every == 10 and config.trainer.results_folder == "./saved_models"
    with pytest.raises(ConfigError, match="both 'training_data_dir' and a data section"):
        RunConfig.from_dict({**seed, "data": {"kind": "moving-digits"}})


def test_resume_conflicts_name_each_key_a_checkpoint_cannot_honour():
    saved = RunConfig.from_dict(get_preset("debug"))
    same = saved.resolved()  # the U-Net written out field by field, as in config.json
    assert resume_conflicts(saved, same) == []
    honoured = RunConfig.from_dict(debug_config(trainer={"train_num_steps": 99, "max_seconds": 5.0},
                                                sample={"steps": 2}))
    assert resume_conflicts(saved, honoured) == []
    changed = RunConfig.from_dict(debug_config(trainer={"train_lr": 0.5}, model={"dim": 16},
                                               diffusion={"timesteps": 30}))
    assert resume_conflicts(saved, changed) == [
        "model.dim (8 -> 16)", "diffusion.timesteps (20 -> 30)", "trainer.train_lr (0.0001 -> 0.5)",
    ]
    assert "train_lr" not in RESUME_HONOURED and "train_num_steps" in RESUME_HONOURED


# --- round trip ------------------------------------------------------------------------------

trainer_values = st.fixed_dictionaries({}, optional={
    "train_lr": st.floats(1e-6, 1.0),
    "train_num_steps": st.integers(0, 10**6),
    "train_batch_size": st.integers(1, 8),
    "lr_schedule": st.sampled_from(["constant", "cosine", "linear"]),
    "max_grad_norm": st.one_of(st.none(), st.floats(0.1, 10.0)),
    "adam_betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.999)).map(list),
    "seed": st.integers(0, 2**63 - 1),
    "sample_captions": st.one_of(st.none(), st.lists(st.text(min_size=1).filter(str.strip), max_size=3)),
    "sample_kwargs": st.fixed_dictionaries({}, optional={"sampler": st.sampled_from(["ddpm", "ddim"]),
                                                         "steps": st.integers(1, 20), "eta": st.floats(0, 1)}),
    "max_seconds": st.floats(0, 1e6),
    "save_model_every": st.one_of(st.none(), st.integers(1, 100)),
    "condition_on_captions": st.one_of(st.none(), st.booleans()),
})
diffusion_values = st.fixed_dictionaries({}, optional={
    "timesteps": st.integers(20, 2000),
    "objective": st.sampled_from(["noise", "x0", "v"]),
    "loss_type": st.sampled_from(["l1", "l2", "huber"]),
    "null_cond_prob": st.floats(0, 1),
    "use_dynamic_thres": st.booleans(),
})


@given(trainer=trainer_values, diffusion=diffusion_values, suffix=st.sampled_from([".yaml", ".json"]))
def test_run_config_round_trips_through_yaml_and_json(tmp_path_factory, trainer, diffusion, suffix):
    import yaml

    config = RunConfig.from_dict(debug_config(trainer=trainer, diffusion=diffusion))
    data = config.to_dict()
    assert RunConfig.from_dict(data) == config
    path = tmp_path_factory.mktemp("rt") / f"run{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    assert RunConfig.from_dict(load_config_file(path)) == config
    assert json.loads(config.to_json()) == data


# --- hostile files and values -----------------------------------------------------------------


@given(depth=st.integers(65, 100_000), flow=st.booleans())
def test_deep_yaml_is_refused_before_parsing_recurses(tmp_path_factory, depth, flow):
    if not flow:
        depth = 65 + depth % 640  # block style indents: deeper files pass the 1 MiB size limit
    if flow:
        text = "trainer: {sample_kwargs: " + "[" * depth + "]" * depth + "}\n"
    else:
        text = "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v: 1\n"
    path = tmp_path_factory.mktemp("deep") / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="nests deeper than 64 levels"):
        load_config_file(path)


@given(depth=st.integers(65, 100_000))
def test_deep_json_is_refused(tmp_path_factory, depth):
    path = tmp_path_factory.mktemp("deep") / "run.json"
    path.write_text('{"trainer": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ValueError, match="nests deeper than 64 levels"):
        load_config_file(path)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = "trainer:\n  sample_kwargs:\n" + "".join(f"    {line}\n" for line in lines)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"more than {MAX_NODES:,} values"):
        load_config_file(path)
    # Aliases that stay small are fine, and read as YAML reads them.
    assert yaml_load("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}


def test_config_files_must_be_regular_utf8_files(tmp_path):
    import os

    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a FIFO"):
        load_config_file(fifo)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"trainer: {train_lr: \xff}\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_config_file(bad)
    big = tmp_path / "big.json"
    big.write_text("{" + " " * (1 << 20) + "}")
    with pytest.raises(ValueError, match="at most 1,048,576"):
        load_config_file(big)


MEMORY_KEYS = {  # key -> the smallest power of two that no machine holds (terabytes at least)
    ("trainer", "train_batch_size"): 30,
    ("diffusion", "image_size"): 17,
    ("diffusion", "timesteps"): 34,
    ("sample", "batch_size"): 30,
    ("model", "dim"): 20,
}


@given(key=st.sampled_from(sorted(MEMORY_KEYS)), extra=st.integers(0, 40))
def test_settings_too_large_for_the_machine_name_their_key(key, extra):
    section, name = key
    value = 2 ** (MEMORY_KEYS[key] + extra)
    with pytest.raises(ConfigError) as info:
        validate_config(debug_config(**{section: {name: value}}))
    message = str(info.value)
    assert f"{section}.{name}" in message and "\n" not in message


SCALAR_KEYS = [
    (section.key, name)
    for section in (DiffusionConfig, TrainerConfig, SampleConfig)
    for name, field in section.__dataclass_fields__.items()
    if any(t in str(field.type) for t in ("int", "float", "bool")) and name != "adam_betas"
] + [("data", "num_videos"), ("data", "digit_size"), ("data", "speed"), ("data", "seed"), ("model", "dim"),
     ("model", "attn_heads")]

hostile_values = st.one_of(
    st.integers(-(10**30), 10**30),
    st.integers(0, 400).map(lambda k: 10**k),
    st.integers(0, 400).map(lambda k: -(10**k)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@given(key=st.sampled_from(SCALAR_KEYS), value=hostile_values)
def test_any_value_of_any_numeric_key_is_taken_or_refused_naming_the_key(key, value):
    section, name = key
    try:
        config = RunConfig.from_dict(debug_config(**{section: {name: value}}))
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        assert f"{section}.{name}" in message or f"{section}: " in message, message
        return
    # Taken: then it is what the config holds, and it round-trips.
    assert RunConfig.from_dict(config.to_dict()) == config


yaml_like = st.text(alphabet=st.sampled_from(list("[]{}:,&*-! \n\t'\"ab1.e#|>?%@`")), max_size=200)


@given(text=st.one_of(yaml_like, st.text(max_size=100)), suffix=st.sampled_from([".yaml", ".json"]))
def test_any_file_text_is_read_or_refused_as_a_value_error(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"run{suffix}"
    path.write_text(text)
    try:
        data = load_config_file(path)
        RunConfig.from_dict(data)
    except ValueError as err:  # ConfigError, unets.guards.BadFileError: never a traceback type
        assert "\n" not in str(err)


def test_flow_process_options():
    from diffusion.config import ConfigError, DiffusionConfig

    config = DiffusionConfig.from_dict({"image_size": 8, "num_frames": 4, "process": "flow", "shift": 3.0})
    assert config.process == "flow" and config.shift == 3.0
    with pytest.raises(ConfigError, match="diffusion.process 'flow' .* leave diffusion.objective at their defaults"):
        DiffusionConfig.from_dict({"image_size": 8, "num_frames": 4, "process": "flow", "objective": "v"})
    with pytest.raises(ConfigError, match="diffusion.process"):
        DiffusionConfig.from_dict({"image_size": 8, "num_frames": 4, "process": "rectified"})
    with pytest.raises(ConfigError, match="diffusion.zero_terminal_snr needs diffusion.objective 'v' or 'x0'"):
        DiffusionConfig.from_dict({"image_size": 8, "num_frames": 4, "zero_terminal_snr": True})
    with pytest.raises(ConfigError, match="diffusion.shift"):
        DiffusionConfig.from_dict({"image_size": 8, "num_frames": 4, "process": "flow", "shift": 0})
