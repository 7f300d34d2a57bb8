"""The CLIP text encoder of SD-1.x style bases, from a tiny random CLIP and a tokenizer built
here (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from byo_models import CROSS_DIM, tiny_clip, write_clip_tokenizer  # noqa: E402
from diffusion.text import CachedTextEncoder, CLIPTextEncoder  # noqa: E402
from unets.guards import BadFileError  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tiny_clip().save_pretrained(root / "text_encoder")
    write_clip_tokenizer(root / "tokenizer")
    return root


def test_sd_layout_pads_to_max_length_and_matches_the_model(pipeline):
    encoder = CLIPTextEncoder(pipeline)
    out = encoder.encode(["a red ball", "the blue square moves left"])
    assert out.tokens.shape == (2, encoder.max_length, CROSS_DIM)
    assert bool(out.mask.all())
    ids = encoder.tokenizer(["a red ball"], padding="max_length", max_length=encoder.max_length, return_tensors="pt")
    reference = encoder.model(input_ids=ids["input_ids"]).last_hidden_state
    torch.testing.assert_close(out.tokens[:1], reference)
    # Words of the vocabulary are one token each: start, 3 words, end.
    assert ids["input_ids"][0, :5].tolist()[0] == 0 and ids["input_ids"][0, 4].item() == 1
    assert encoder.encode([""]).tokens.shape == (1, encoder.max_length, CROSS_DIM)


def test_text_encoder_folder_finds_its_sibling_tokenizer_and_caches(pipeline):
    direct = CLIPTextEncoder(pipeline / "text_encoder")
    cached = CachedTextEncoder(direct)
    first = cached.encode(["a ball moves up"]).tokens
    torch.testing.assert_close(first, CLIPTextEncoder(pipeline).encode(["a ball moves up"]).tokens)
    assert len(cached) == 1


def test_missing_parts_are_clear_errors(tmp_path, pipeline):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        CLIPTextEncoder(tmp_path / "nowhere")
    with pytest.raises(BadFileError, match="config.json"):
        CLIPTextEncoder(tmp_path)
    (tmp_path / "text_encoder").symlink_to(pipeline / "text_encoder")
    with pytest.raises(BadFileError, match="vocab.json and merges.txt"):
        CLIPTextEncoder(tmp_path)
