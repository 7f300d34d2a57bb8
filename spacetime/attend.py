"""attend(q, k, v, bias, causal, backend): the one call every attention layer makes.

PROVISIONAL: math backend only. The backend registry (sdpa, flash, efficient, cudnn, flex,
xformers, auto, backend_support, attention_backend, SPACETIME_ATTN_BACKEND, batch chunking)
is being written in this file; the signature below is fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    *,
    causal: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Scaled dot-product attention. q `(B, heads, Nq, D)`, k/v `(B, heads, Nk, D)`, bias
    broadcastable to `(B, heads, Nq, Nk)` and added to the logits (a bool bias is a keep-mask);
    `causal` masks keys after the query's position (aligned at the end)."""
    scale = q.shape[-1] ** -0.5
    sim = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        if bias.dtype == torch.bool:
            sim = sim.masked_fill(~bias, torch.finfo(sim.dtype).min)
        else:
            sim = sim + bias.to(sim.dtype)
    if causal:
        i, j = sim.shape[-2:]
        mask = torch.ones(i, j, dtype=torch.bool, device=q.device).triu(j - i + 1)
        sim = sim.masked_fill(mask, torch.finfo(sim.dtype).min)
    return torch.matmul(sim.softmax(dim=-1), v)
