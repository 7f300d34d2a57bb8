"""`unets.from_diffusers` / `save_diffusers` against diffusers itself: tiny random
`UNet3DConditionModel` and `UNetMotionModel` (UNet2DConditionModel + MotionAdapter), every
weight moved off its initialisation (diffusers zero-inits the last temporal conv and the
motion modules' output) so the temporal layers matter; outputs equal in fp32 to 1e-4."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import unets
from unets.convert import read_diffusers_folder

diffusers = pytest.importorskip("diffusers")
attend_module = importlib.import_module("spacetime.attend")

FRAMES = 3


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _unet3d():
    torch.manual_seed(0)
    model = diffusers.UNet3DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4, sample_size=8,
    )
    return _perturb(model)


def _unet2d_and_adapter(motion_heads: int = 2):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=2, sample_size=8,
    )
    adapter = diffusers.MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1,
                                      motion_num_attention_heads=motion_heads, motion_norm_num_groups=4,
                                      motion_max_seq_length=8)
    return _perturb(unet, 1), _perturb(adapter, 2)


def _inputs(batch: int = 2, tokens: int = 5):
    torch.manual_seed(3)
    x = torch.randn(batch, 4, FRAMES, 8, 8)
    t = torch.tensor([3, 700, 250][:batch])
    cond = torch.randn(batch, tokens, 16)
    return x, t, cond


def _reference_3d(ref, x, t, cond):
    with torch.no_grad():
        return ref(x, t, encoder_hidden_states=cond).sample


def _reference_motion(ref, x, t, cond):
    # UNetMotionModel's caller repeats the tokens per frame; ours takes them per video.
    with torch.no_grad():
        return ref(x, t, encoder_hidden_states=cond.repeat_interleave(x.shape[2], dim=0)).sample


def _ours(model, x, t, cond):
    with torch.no_grad():
        return model.eval()(x, t, cond=cond)


def test_unet3d_instance_gives_the_same_outputs():
    ref = _unet3d()
    model = unets.from_diffusers(ref)
    assert isinstance(model, unets.ModelScopeUnet) and model.config.unet_name == "modelscope"
    x, t, cond = _inputs()
    expected = _reference_3d(ref, x, t, cond)
    torch.testing.assert_close(_ours(model, x, t, cond), expected, atol=1e-4, rtol=1e-4)
    # the temporal layers matter: switching them off changes the output
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cond=cond, enable_time=False), expected, atol=1e-3)


def test_unet3d_folder_and_export_round_trip(tmp_path):
    ref = _unet3d()
    ref.save_pretrained(tmp_path / "ref")
    model = unets.from_diffusers(tmp_path / "ref")
    x, t, cond = _inputs()
    expected = _reference_3d(ref, x, t, cond)
    torch.testing.assert_close(_ours(model, x, t, cond), expected, atol=1e-4, rtol=1e-4)

    folder = model.save_diffusers(tmp_path / "out")
    again = diffusers.UNet3DConditionModel.from_pretrained(folder).eval()
    torch.testing.assert_close(_reference_3d(again, x, t, cond), expected, atol=1e-4, rtol=1e-4)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet3DConditionModel"
    # and back once more: same weights, bit for bit
    back = unets.from_diffusers(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_a_pipeline_folder_is_read_from_its_unet_subfolder(tmp_path):
    ref = _unet3d()
    ref.save_pretrained(tmp_path / "pipe" / "unet")
    model = unets.from_diffusers(tmp_path / "pipe")
    x, t, cond = _inputs()
    torch.testing.assert_close(_ours(model, x, t, cond), _reference_3d(ref, x, t, cond), atol=1e-4, rtol=1e-4)


def test_animatediff_from_unet2d_and_adapter_instances_and_folders(tmp_path):
    unet, adapter = _unet2d_and_adapter()
    ref = diffusers.UNetMotionModel.from_unet2d(unet, adapter).eval()
    x, t, cond = _inputs()
    expected = _reference_motion(ref, x, t, cond)

    model = unets.from_diffusers(unet, motion_adapter=adapter)
    assert isinstance(model, unets.AnimateDiffUnet)
    torch.testing.assert_close(_ours(model, x, t, cond), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cond=cond, enable_time=False), expected, atol=1e-3)

    unet.save_pretrained(tmp_path / "unet")
    adapter.save_pretrained(tmp_path / "adapter")
    from_folders = unets.from_diffusers(tmp_path / "unet", motion_adapter=tmp_path / "adapter")
    torch.testing.assert_close(_ours(from_folders, x, t, cond), expected, atol=1e-4, rtol=1e-4)

    ref.save_pretrained(tmp_path / "motion")
    whole = unets.from_diffusers(tmp_path / "motion")
    torch.testing.assert_close(_ours(whole, x, t, cond), expected, atol=1e-4, rtol=1e-4)
    assert {p.numel() for p in model.temporal_parameters()} and (
        sum(p.numel() for p in model.temporal_parameters()) == sum(p.numel() for p in adapter.parameters())
    )


def test_animatediff_export_round_trips(tmp_path):
    unet, adapter = _unet2d_and_adapter()
    model = unets.from_diffusers(unet, motion_adapter=adapter)
    with torch.no_grad():  # as after fine-tuning the motion modules
        for p in model.temporal_parameters():
            p.add_(0.05)
    x, t, cond = _inputs()
    expected = _ours(model, x, t, cond)

    adapter_dir = model.save_diffusers(tmp_path / "adapter")
    new_adapter = diffusers.MotionAdapter.from_pretrained(adapter_dir)
    ref = diffusers.UNetMotionModel.from_unet2d(unet, new_adapter).eval()
    torch.testing.assert_close(_reference_motion(ref, x, t, cond), expected, atol=1e-4, rtol=1e-4)

    unet_dir = model.save_diffusers(tmp_path / "unet", part="unet")
    new_unet = diffusers.UNet2DConditionModel.from_pretrained(unet_dir)
    ref = diffusers.UNetMotionModel.from_unet2d(new_unet, new_adapter).eval()
    torch.testing.assert_close(_reference_motion(ref, x, t, cond), expected, atol=1e-4, rtol=1e-4)

    whole_dir = model.save_diffusers(tmp_path / "whole", part="unet_motion")
    ref = diffusers.UNetMotionModel.from_pretrained(whole_dir).eval()
    torch.testing.assert_close(_reference_motion(ref, x, t, cond), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="part must be one of"):
        model.save_diffusers(tmp_path / "bad", part="vae")


def test_chunked_temporal_attention_gives_the_same_outputs(monkeypatch):
    """Temporal attention folds B*H*W into the attention batch; `attend` splits it below
    CUDA's grid limit (xformers#845). Lowering the limit forces the split on CPU."""
    ref = _unet3d()
    model = unets.from_diffusers(ref)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "sdpa"  # a backend declared batch-limited
    x, t, cond = _inputs()
    expected = _reference_3d(ref, x, t, cond)
    calls = []
    sdpa = attend_module.AttentionBackend("sdpa")
    entry = attend_module._BACKENDS[sdpa]
    real = entry.run

    def counting(q, *args):
        calls.append(q.shape[0])
        return real(q, *args)

    monkeypatch.setattr(attend_module, "CUDA_GRID_LIMIT", 7)
    monkeypatch.setitem(attend_module._BACKENDS, sdpa, dataclasses.replace(entry, run=counting))
    torch.testing.assert_close(_ours(model, x, t, cond), expected, atol=1e-4, rtol=1e-4)
    assert calls and max(calls) <= 7


def test_other_classes_and_wrong_pairs_are_refused(tmp_path):
    unet, adapter = _unet2d_and_adapter()
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"UNet2DConditionModel is an image U-Net.*motion_adapter"):
        unets.from_diffusers(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"source is a MotionAdapter"):
        unets.from_diffusers(adapter)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"holds a AutoencoderKL; accepted: \['UNet3DConditionModel'"):
        unets.from_diffusers(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"motion_adapter holds a UNet2DConditionModel"):
        unets.from_diffusers(unet, motion_adapter=unet)
    with pytest.raises(TypeError, match="must be a diffusers model or the path"):
        unets.from_diffusers(42)


def test_unsupported_options_are_named():
    torch.manual_seed(0)
    lcm = diffusers.UNet3DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4, time_cond_proj_dim=8,
    )
    with pytest.raises(ValueError, match=r"time_cond_proj_dim=8 is not supported"):
        unets.from_diffusers(lcm)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    ref = _unet3d()
    folder = tmp_path / "ref"
    ref.save_pretrained(folder)
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    dropped = "down_blocks.0.temp_convs.0.conv4.3.weight"
    del weights[dropped]
    weights["down_blocks.0.stray.weight"] = torch.zeros(1)
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError) as info:
        unets.from_diffusers(folder)
    assert dropped in str(info.value) and "down_blocks.0.stray.weight" in str(info.value)


def test_bin_weights_are_read_weights_only(tmp_path):
    ref = _unet3d()
    ref.save_pretrained(tmp_path / "ref", safe_serialization=False)
    name, _, state = read_diffusers_folder(tmp_path / "ref")
    assert name == "UNet3DConditionModel" and set(state) == set(ref.state_dict())
    (tmp_path / "ref" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable weights-only torch file"):
        read_diffusers_folder(tmp_path / "ref")


def test_modelscope_original_layout_round_trips(tmp_path):
    from unets.original_keys import from_modelscope_original, to_modelscope_original

    ref = _unet3d()
    model = unets.from_diffusers(ref)
    original = to_modelscope_original(ref.state_dict(), model.config)
    assert any(".temopral_conv." in k for k in original) and "input_blocks.0.0.weight" in original
    assert "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in original
    assert original["input_blocks.0.1.proj_in.weight"].ndim == 3  # the original's 1-D conv
    assert all(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out."))
               for k in original)
    back = from_modelscope_original({f"model.diffusion_model.{k}": v for k, v in original.items()}, model.config)
    assert set(back) == set(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back[key], value), key
    with pytest.raises(ValueError, match=r"unexpected keys .*input_blocks\.99\.0\.weight"):
        from_modelscope_original({**original, "input_blocks.99.0.weight": torch.zeros(1)}, model.config)


def test_animatediff_original_layout_round_trips(tmp_path):
    from safetensors.torch import save_file as save

    from unets.original_keys import from_animatediff_original, to_animatediff_original

    unet, adapter = _unet2d_and_adapter()
    original = to_animatediff_original(adapter.state_dict())
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q.weight" \
        in original
    assert "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight" in original
    assert "up_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.norms.0.bias" in original
    back, config = from_animatediff_original(original)
    assert set(back) == set(adapter.state_dict())
    for key, value in adapter.state_dict().items():
        assert torch.equal(back[key], value), key
    assert config["block_out_channels"] == [8, 16] and config["motion_layers_per_block"] == 1
    assert config["motion_max_seq_length"] == 8 and config["use_motion_mid_block"]

    # from files, as users hold them: the head count is not stored (8 in every release),
    # the group count is the U-Net's
    unet, adapter = _unet2d_and_adapter(motion_heads=8)
    original = to_animatediff_original(adapter.state_dict())
    save({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "mm_tiny.safetensors"))
    torch.save(original, tmp_path / "mm_tiny.ckpt")
    x, t, cond = _inputs()
    expected = _reference_motion(diffusers.UNetMotionModel.from_unet2d(unet, adapter).eval(), x, t, cond)
    for name in ("mm_tiny.safetensors", "mm_tiny.ckpt"):
        model = unets.from_diffusers(unet, motion_adapter=tmp_path / name)
        torch.testing.assert_close(_ours(model, x, t, cond), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"unexpected keys in the motion-module checkpoint.*conv_in"):
        from_animatediff_original({**original, "conv_in.weight": torch.zeros(1)})


def test_modelscope_original_file_loads_with_the_released_config(tmp_path):
    """A `.pth` source is ModelScope's release file; its config is the 1.7B one (built on the
    meta device here: only the key map and the checks run, nothing is allocated)."""
    from unets.modelscope import ModelScopeUnetConfig
    from unets.original_keys import to_modelscope_original

    config = ModelScopeUnetConfig()
    with torch.device("meta"):
        full = unets.build(config)
    names = set(to_modelscope_original(full.state_dict(), config))
    assert len(names) == len(full.state_dict())
    torch.save({"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, tmp_path / "text2video_pytorch_model.pth")
    with pytest.raises(ValueError, match=r"missing weights \['conv_in.bias'"):
        unets.from_diffusers(tmp_path / "text2video_pytorch_model.pth")


def test_deeper_configs_match_too():
    """Three levels, two layers per level, attention not at the first level; AnimateDiff with
    linear projections (SD 2.x style) and no mid-block motion module."""
    torch.manual_seed(0)
    ref = _perturb(diffusers.UNet3DConditionModel(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"), layers_per_block=2,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
    ))
    x, t, cond = _inputs()
    x = torch.randn(2, 4, FRAMES, 16, 16)
    torch.testing.assert_close(_ours(unets.from_diffusers(ref), x, t, cond), _reference_3d(ref, x, t, cond),
                               atol=1e-4, rtol=1e-4)
    unet = _perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2, use_linear_projection=True,
    ))
    adapter = _perturb(diffusers.MotionAdapter(block_out_channels=(8, 16, 16), motion_layers_per_block=2,
                                               motion_num_attention_heads=2, motion_norm_num_groups=4,
                                               motion_max_seq_length=8, use_motion_mid_block=False), 2)
    ref = diffusers.UNetMotionModel.from_unet2d(unet, adapter).eval()
    model = unets.from_diffusers(unet, motion_adapter=adapter)
    assert model.mid_block.motion_modules is None
    torch.testing.assert_close(_ours(model, x, t, cond), _reference_motion(ref, x, t, cond), atol=1e-4, rtol=1e-4)


def test_a_folder_is_loaded_without_copies_and_an_instance_with_them(tmp_path):
    """Weights read from a file become the model's own tensors (mapped, as diffusers'
    from_pretrained leaves them); a model passed in is copied, never shared."""
    ref = _unet3d()
    ref.save_pretrained(tmp_path / "ref")
    from_folder = unets.from_diffusers(tmp_path / "ref")
    from_instance = unets.from_diffusers(ref)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for p in from_instance.parameters():
            p.add_(1.0)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, before[key]), key
    # In-place updates (an optimizer step) stay in the process: the file is unchanged.
    file_before = load_file(str(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"))
    with torch.no_grad():
        for p in from_folder.parameters():
            p.mul_(2.0)
    file_after = load_file(str(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(file_before[k], file_after[k]) for k in file_before)
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in from_folder.parameters())


def test_half_precision_files_load_into_the_models_dtype(tmp_path):
    ref = _unet3d()
    ref.half().save_pretrained(tmp_path / "ref")
    model = unets.from_diffusers(tmp_path / "ref")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x, t, cond = _inputs()
    expected = _reference_3d(ref.float(), x, t, cond)
    torch.testing.assert_close(_ours(model, x, t, cond), expected, atol=1e-4, rtol=1e-4)


def test_saving_over_the_folder_a_model_was_loaded_from(tmp_path):
    """The loaded weights map the old file: save_diffusers writes a new one beside it and
    renames it into place, so the model (and the saved folder) stay whole."""
    ref = _unet3d()
    ref.save_pretrained(tmp_path / "ref")
    model = unets.from_diffusers(tmp_path / "ref")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "temp" in name or "transformer_in" in name:
                p.add_(0.01)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_diffusers(tmp_path / "ref")
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    back = unets.from_diffusers(tmp_path / "ref")
    for key, value in back.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
