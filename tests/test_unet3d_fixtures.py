"""Unet3D checkpoints saved by the v1 code (tests/fixtures/unet3d-v1, written by its
make_fixtures.py: state-dict layout 1, no version in their metadata) load with `unets.load`,
`unets.load_weights` and `load_state_dict` and give the same outputs; the key map from
layout 1 to the current one (`unets.upgrade`) covers every key exactly once."""

from __future__ import annotations

import copy
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import unets
from unets.guards import BadFileError
from unets.upgrade import layout_version, upgrade_key, upgrade_module_state, upgrade_optimizer_state

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures" / "unet3d-v1"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def _run(net: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {"cond_mask": data["cond_mask"]} if "cond_mask" in data else {}
    with torch.no_grad():
        return net.eval()(data["x"], data["time"], data.get("cond"), **kwargs)


def test_every_case_is_present():
    assert CASES == ["plain", "pooled-full3d", "tokens-cross"]


@pytest.mark.parametrize("case", CASES)
def test_load_reproduces_the_saved_output(case):
    data = load_file(str(FIXTURES / case / "io.safetensors"))
    net = unets.load(FIXTURES / case)
    assert type(net).__name__ == "Unet3D"
    torch.testing.assert_close(_run(net, data), data["expected"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_load_weights_of_the_saved_state_dict(case):
    data = load_file(str(FIXTURES / case / "io.safetensors"))
    state = load_file(str(FIXTURES / case / "model.safetensors"))
    fresh = unets.build(unets.load(FIXTURES / case).config.to_dict())
    unets.load_weights(fresh, state)
    torch.testing.assert_close(_run(fresh, data), data["expected"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_cond_format_of_the_saved_configs(case):
    expected = {"plain": None, "pooled-full3d": "pooled", "tokens-cross": "tokens"}[case]
    assert unets.load(FIXTURES / case).cond_format == expected


def test_text2video_from_scratch_config():
    """text2video-from-scratch's U-Net options (video-diffusion-pytorch names): `block_type` is
    ignored whatever its value, `init_dim: null` means dim, bert conditioning fixes cond_dim."""
    options = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 4, "resnet_groups": 4,
               "block_type": "basic", "use_sparse_linear_attn": True, "init_kernel_size": 7,
               "init_dim": None, "use_bert_text_cond": True}
    net = unets.build("unet3d", **options)
    reference = unets.build("unet3d", **(options | {"block_type": "resnet"}))
    assert net.config.block_type == "basic" and net.cond_format == "pooled" and net.cond_dim == 384
    assert [k for k, _ in net.named_parameters()] == [k for k, _ in reference.named_parameters()]
    reference.load_state_dict(net.state_dict())
    x, t, cond = torch.randn(1, 3, 2, 8, 8), torch.tensor([5]), torch.randn(1, 384)
    torch.testing.assert_close(_run(net, {"x": x, "time": t, "cond": cond}),
                               _run(reference, {"x": x, "time": t, "cond": cond}))
    with pytest.raises(TypeError, match="block_type"):
        unets.build("unet3d", **(options | {"block_type": 3}))


# ---------------------------------------------------------------------------------------------
# layout 1 -> 2: the key map (unets.upgrade)

RESNET = re.compile(r"((?:downs|ups)\.\d+\.block[12]|mid_block[12]|final_block)\.(.*)")


def v1_name(key: str) -> str:
    """Layout-1 name of a current Unet3D key, described independently of the key map: inside a
    resnet block, the embedding projection was `emb_proj.1` (a Sequential after SiLU), each
    half's conv `proj`, and the residual a plain Conv3d `res_conv`."""
    match = RESNET.fullmatch(key)
    if match is None:
        return key
    block, rest = match.groups()
    rest = {"emb_proj.weight": "emb_proj.1.weight", "emb_proj.bias": "emb_proj.1.bias",
            "res_conv.spatial.weight": "res_conv.weight", "res_conv.spatial.bias": "res_conv.bias"}.get(rest, rest)
    rest = re.sub(r"^(block[12])\.project\.", r"\1.proj.", rest)
    return f"{block}.{rest}"


def v1_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`net`'s weights as layout 1 stored them (the residual weight with its time axis)."""
    return {v1_name(k): (v[:, :, None] if k.endswith("res_conv.spatial.weight") else v).clone()
            for k, v in net.state_dict().items()}


@pytest.mark.parametrize("case", CASES)
def test_the_v1_description_matches_the_v1_files(case):
    saved = load_file(str(FIXTURES / case / "model.safetensors"))
    net = unets.load(FIXTURES / case)
    described = v1_state(net)
    assert sorted(described) == sorted(saved)
    assert all(described[k].shape == saved[k].shape for k in saved)
    assert layout_version(net) == 2 and layout_version("unet3d") == 2 and layout_version("space_time_unet") == 1


@st.composite
def unet3d_options(draw):
    options = dict(dim=8, attn_heads=2, attn_dim_head=4, resnet_groups=4, init_kernel_size=3,
                   dim_mults=tuple(draw(st.lists(st.sampled_from([1, 2]), min_size=1, max_size=3))),
                   conv_type=draw(st.sampled_from(["spatial", "full3d"])),
                   use_sparse_linear_attn=draw(st.booleans()), init_dim=draw(st.sampled_from([None, 4, 12])))
    cond = draw(st.sampled_from([None, "pooled", "tokens"]))
    if cond is not None:
        options.update(cond_dim=6, text_cross_attn=cond == "tokens")
    return options


@settings(max_examples=25, deadline=None)
@given(unet3d_options())
def test_the_key_map_takes_every_v1_key_to_one_current_key(options):
    with torch.device("meta"):
        net = unets.build("unet3d", **options)
    current = list(net.state_dict())
    old = [v1_name(k) for k in current]
    assert len(set(old)) == len(old)
    upgraded = [upgrade_key("unet3d", k)[0] for k in old]
    # Every current key is reached, exactly once, from its own layout-1 name...
    assert upgraded == current
    # ...and current keys are left alone, so a file of unknown layout can take every map.
    assert all(not upgrade_key("unet3d", k)[1] for k in current)
    assert all(upgrade_key("unet3d", k, 2) == (k, []) for k in old)


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_and_a_wrapping_module_read_v1(case):
    """Trainer checkpoints hold the U-Net inside the diffusion module: the map applies under
    its prefix, through plain `load_state_dict`, on a deep copy (EMA) too."""
    data = load_file(str(FIXTURES / case / "io.safetensors"))
    saved = load_file(str(FIXTURES / case / "model.safetensors"))
    fresh = unets.build(unets.load(FIXTURES / case).config.to_dict())
    wrapper = torch.nn.ModuleDict({"denoise_fn": copy.deepcopy(fresh)})
    prefixed = {f"denoise_fn.{k}": v for k, v in saved.items()}
    upgraded = upgrade_module_state(wrapper, prefixed)
    assert sorted(upgraded) == sorted(wrapper.state_dict()) and sorted(prefixed) != sorted(upgraded)
    wrapper.load_state_dict(prefixed)
    fresh.load_state_dict(saved)
    for net in (fresh, wrapper["denoise_fn"]):
        torch.testing.assert_close(_run(net, data), data["expected"], atol=1e-5, rtol=1e-5)


def test_unknown_and_missing_keys_still_raise_naming_them():
    saved = dict(load_file(str(FIXTURES / "plain" / "model.safetensors")))
    net = unets.load(FIXTURES / "plain")
    del saved["mid_block1.emb_proj.1.weight"]
    saved["mid_block1.emb_proj.2.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing weights \['mid_block1\.emb_proj\.weight'\]") as err:
        unets.load_weights(net, saved)
    assert "mid_block1.emb_proj.2.weight" in str(err.value)
    with pytest.raises(RuntimeError, match="mid_block1.emb_proj.2.weight"):
        net.load_state_dict(saved)


def test_two_layouts_of_one_weight_in_a_state_dict_are_refused():
    net = unets.load(FIXTURES / "plain")
    state = dict(net.state_dict()) | {"mid_block1.emb_proj.1.weight": net.mid_block1.emb_proj.weight}
    with pytest.raises(ValueError, match="mid_block1.emb_proj.1.weight"):
        unets.load_weights(net, state)


def test_a_fresh_save_records_its_layout_and_reloads_bit_identically(tmp_path):
    data = load_file(str(FIXTURES / "tokens-cross" / "io.safetensors"))
    net = unets.load(FIXTURES / "tokens-cross")
    net.save_pretrained(tmp_path / "v2")
    with safe_open(str(tmp_path / "v2" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["state_dict_version"] == "2"
    again = unets.load(tmp_path / "v2")
    state, reloaded = net.state_dict(), again.state_dict()
    assert list(state) == list(reloaded) and all(torch.equal(state[k], reloaded[k]) for k in state)
    assert torch.equal(_run(net, data), _run(again, data))


def _rewrite_version(folder: Path, version: str, state: dict[str, torch.Tensor] | None = None) -> None:
    weights = folder / "model.safetensors"
    save_file(state if state is not None else load_file(str(weights)), str(weights),
              metadata={"format": "pt", "state_dict_version": version})


def test_a_newer_or_malformed_layout_version_is_refused(tmp_path):
    shutil.copytree(FIXTURES / "plain", tmp_path / "m")
    _rewrite_version(tmp_path / "m", "3")
    with pytest.raises(ValueError, match="version 3.*up to 2"):
        unets.load(tmp_path / "m")
    _rewrite_version(tmp_path / "m", "two")
    with pytest.raises(BadFileError, match="state_dict_version='two'"):
        unets.load(tmp_path / "m")


def test_a_file_that_says_layout_2_is_not_remapped(tmp_path):
    """The recorded version is believed: layout-1 names in a file marked 2 are an error."""
    shutil.copytree(FIXTURES / "plain", tmp_path / "m")
    _rewrite_version(tmp_path / "m", "2")
    with pytest.raises(ValueError, match=r"unexpected weights \[.*'downs\.0\.block1\.emb_proj\.1\.bias'"):
        unets.load(tmp_path / "m")


def test_optimizer_state_of_a_v1_run_resumes_exactly():
    """A trainer checkpoint keys the optimizer state by parameter name: Adam's moments of a
    layout-1 run move to the current names (and the residual's shape) with the weights."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"model": unets.build("unet3d", preset="debug")})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(1, 3, 2, 8, 8)
    model["model"](x, torch.tensor([4])).square().mean().backward()
    opt.step()
    saved = get_optimizer_state_dict(model, opt)
    residuals = {k for k in saved["state"] if k.endswith("res_conv.spatial.weight")}
    assert residuals
    old = {
        "state": {f"model.{v1_name(k[6:])}": {n: t[:, :, None] if k in residuals and t.ndim else t
                                               for n, t in s.items()} for k, s in saved["state"].items()},
        "param_groups": [{**g, "params": [f"model.{v1_name(n[6:])}" for n in g["params"]]}
                         for g in saved["param_groups"]],
    }
    assert set(old["state"]) != set(saved["state"])
    upgraded = upgrade_optimizer_state(model, old)
    assert upgraded["param_groups"] == saved["param_groups"]
    assert list(upgraded["state"]) == list(saved["state"])
    for k, s in saved["state"].items():
        assert all(torch.equal(s[n], upgraded["state"][k][n]) for n in s)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    set_optimizer_state_dict(model, fresh, upgraded)
    assert all(torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"]) for p in model.parameters())


def test_a_trainer_checkpoint_of_layout_1_resumes(tmp_path):
    """End to end: a run's checkpoint rewritten to layout-1 names (weights, EMA, optimizer)
    resumes into the current Unet3D with the same weights and optimizer state."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_trainer import HashTextEncoder, Videos, make_trainer

    from diffusion import checkpoint as ckpt
    from diffusion.gaussian import GaussianDiffusion

    def diffusion() -> GaussianDiffusion:
        torch.manual_seed(0)
        encoder = HashTextEncoder()
        net = unets.build("unet3d", preset="debug", channels=1, cond_dim=encoder.dim)
        return GaussianDiffusion(net, image_size=8, num_frames=2, channels=1, timesteps=10, text_encoder=encoder)

    options = dict(dataset=Videos(n=3, frames=2), train_batch_size=1, gradient_accumulate_every=1,
                   train_num_steps=2, save_and_sample_every=2, num_sample_rows=1, image_phase_steps=0,
                   image_ratio=0.0)
    trained = make_trainer(tmp_path / "run", diffusion=diffusion(), **options)
    trained.train()
    folder = ckpt.CheckpointManager(tmp_path / "run").latest()
    prefix = next(n for n, m in trained.model.named_modules() if type(m).__name__ == "Unet3D") + "."

    def old(name: str) -> str:
        return prefix + v1_name(name[len(prefix):]) if name.startswith(prefix) else name

    def old_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[:, :, None] if name.endswith("res_conv.spatial.weight") and t.ndim else t

    for which in ("model", "ema"):
        state = load_file(str(folder / f"{which}.safetensors"))
        renamed = {old(k): old_tensor(k, v).contiguous() for k, v in state.items()}
        save_file(renamed, str(folder / f"{which}.safetensors"))
    state = ckpt.load_state(folder / "state.pt")
    optim = state["optimizer"]
    optim["state"] = {old(k): {n: old_tensor(k, t) for n, t in s.items()} for k, s in optim["state"].items()}
    optim["param_groups"] = [{**g, "params": [old(n) for n in g["params"]]} for g in optim["param_groups"]]
    assert any(".emb_proj.1." in k for k in optim["state"])
    ckpt.save_state(state, folder / "state.pt")

    resumed = make_trainer(tmp_path / "run", diffusion=diffusion(), **options)
    resumed.load()
    assert resumed.step == trained.step
    for a, b in ((trained.model, resumed.model), (trained.ema_model, resumed.ema_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    params = dict(resumed.model.named_parameters())
    for name, p in trained.model.named_parameters():
        assert torch.equal(trained.opt.state[p]["exp_avg_sq"], resumed.opt.state[params[name]]["exp_avg_sq"])


FIXTURES_V2 = Path(__file__).parent / "fixtures" / "unet3d-v2"


@pytest.mark.parametrize("case", CASES)
def test_layout_2_files_load_as_they_are(case):
    """tests/fixtures/unet3d-v2: the same cases saved by layout 2. Their names are the current
    ones with no map applied, so a later change of names needs a layout 3 and its map."""
    folder = FIXTURES_V2 / case
    data = load_file(str(folder / "io.safetensors"))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["state_dict_version"] == "2"
        saved = list(f.keys())
    net = unets.load(folder)
    assert sorted(saved) == sorted(net.state_dict())
    torch.testing.assert_close(_run(net, data), data["expected"], atol=1e-5, rtol=1e-5)
    # The two layouts were written from the same seeds: the same model.
    v1 = unets.load(FIXTURES / case)
    torch.testing.assert_close(_run(net, data), _run(v1, data), atol=1e-5, rtol=1e-5)
