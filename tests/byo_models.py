"""Tiny random diffusers models (and a CLIP tokenizer built from a small vocabulary) for the
bring-your-own-U-Net tests; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CROSS_DIM = 32


def tiny_unet2d(in_channels: int = 4, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=CROSS_DIM, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    )


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Two blocks: a downsampling factor of 2, so 16x16 pixels give 8x8 latents.
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    )


VOCAB_WORDS = ["a", "red", "blue", "ball", "moves", "left", "right", "square", "the", "up", "down"]


def write_clip_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer over a handful of words: every letter, every word as one token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in VOCAB_WORDS for c in w})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in VOCAB_WORDS:
        # Merge left to right: "r e", "re d</w>" ...
        current = word[0]
        for i, c in enumerate(word[1:], start=1):
            piece = c + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{current} {piece}")
            current = current + piece
            vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tokenizer.save_pretrained(folder)


def tiny_clip(vocab_size: int = 128, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        hidden_size=CROSS_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def write_pipeline(folder: Path, *, unet_in_channels: int = 4, vae_latent_channels: int = 4) -> Path:
    """An SD-1.x style pipeline folder: unet/, vae/, text_encoder/, tokenizer/."""
    tiny_unet2d(unet_in_channels).save_pretrained(folder / "unet")
    tiny_vae(vae_latent_channels).save_pretrained(folder / "vae")
    tiny_clip().save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer")
    return folder
