"""TextPool: masked-mean and attention pooling of condition tokens, and SpaceTimeUnet(cond_pool=)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import unets
from unets.blocks import TextPool


def _masked_mean(tokens, mask):
    w = mask.float()[..., None]
    return (tokens * w).sum(1) / w.sum(1).clamp(min=1)


@given(batch=st.integers(1, 3), length=st.integers(1, 6), dim=st.integers(1, 8), seed=st.integers(0, 5))
def test_mean_and_fresh_attention_pool_are_the_masked_mean(batch, length, dim, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=g)
    mask = torch.rand(batch, length, generator=g) > 0.3
    expected = _masked_mean(tokens, mask)
    torch.testing.assert_close(TextPool(dim, "mean")(tokens, mask), expected)
    # the attention part starts at zero (zero-initialised output map)
    torch.testing.assert_close(TextPool(dim, "attention", heads=2, dim_head=4)(tokens, mask), expected)


def test_attention_pool_ignores_padding_and_survives_empty_rows():
    torch.manual_seed(0)
    pool = TextPool(6, "attention", heads=2, dim_head=4)
    torch.nn.init.normal_(pool.to_out.weight)
    tokens = torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    out = pool(tokens, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], pool.to_out.bias)  # nothing to attend to: mean 0, attention 0
    changed = tokens.clone()
    changed[0, 3:] = 100.0
    torch.testing.assert_close(pool(changed, mask)[0], out[0])
    changed[0, 1] += 1.0
    assert not torch.allclose(pool(changed, mask)[0], out[0])


def test_attention_pool_learns_to_pick_out_one_word():
    # Two "captions" alike but for one token: their means are nearly equal (like MiniLM's
    # "... to the left" / "... to the right"); attention pooling learns to separate them.
    torch.manual_seed(0)
    shared = torch.randn(1, 7, 16) * 3
    words = torch.randn(2, 16)
    tokens = shared.repeat(2, 1, 1)
    tokens[:, 4] = words
    mask = torch.ones(2, 7, dtype=torch.bool)
    pool = TextPool(16, "attention", heads=2, dim_head=8)
    before = (pool(tokens, mask)[0] - pool(tokens, mask)[1]).norm()
    optimizer = torch.optim.Adam(pool.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        pooled = pool(tokens, mask)
        loss = -(pooled[0] - pooled[1]).norm().clamp(max=10.0)
        loss.backward()
        optimizer.step()
    after = (pool(tokens, mask)[0] - pool(tokens, mask)[1]).norm()
    assert after > 5 * before


def test_unknown_pool_and_config():
    with pytest.raises(ValueError, match="cond_pool must be one of"):
        TextPool(4, "max")
    kw = dict(preset="debug", channels=1, cond_dim=12)
    with pytest.raises(ValueError, match="cond_pool must be one of"):
        unets.build("space_time_unet", cond_pool="max", **kw)
    with pytest.raises(ValueError, match="needs cond_dim"):
        unets.build("space_time_unet", preset="debug", cond_pool="attention")
    model = unets.build("space_time_unet", cond_pool="attention", **kw)
    assert model.config.to_dict()["cond_pool"] == "attention"
    assert any(n.startswith("cond_pool.") for n, _ in model.named_parameters())
    # mean pooling has no parameters: state dicts of earlier models still load
    plain = unets.build("space_time_unet", **kw)
    assert not any(n.startswith("cond_pool.") for n, _ in plain.named_parameters())


def test_space_time_unet_attention_pool_round_trip(tmp_path):
    model = unets.build("space_time_unet", preset="debug", channels=1, cond_dim=12, cond_pool="attention")
    torch.manual_seed(0)
    torch.nn.init.normal_(model.cond_pool.to_out.weight)
    unets.save_pretrained(model, tmp_path / "m")
    loaded = unets.load(tmp_path / "m")
    x, t, c = torch.randn(2, 1, 2, 8, 8), torch.tensor([3, 9]), torch.randn(2, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond=c), model(x, t, cond=c))
