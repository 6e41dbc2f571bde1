"""``expose_attention``: nn.MultiheadAttention with its projections as module calls.

torch's nn.MultiheadAttention computes its q/k/v projection with its bare ``in_proj_weight`` and
multiplies by ``out_proj.weight`` without calling ``out_proj``, so no module hook sees either and
both step without curvature (README, "Only module calls are seen").  ``expose_attention(model)``
changes the class of each such module in place to ``ExposedMultiheadAttention``, whose forward
computes the same attention but calls an ``in_proj`` child module (the packed projection, holding
no parameters of its own) and ``out_proj``: both are then Linear layers to the optimizer.  The
parameters stay where they are, so state_dict keys, pretrained weights and checkpoints are
unchanged.

NOTE: [exposed attention] The exposed forward takes every mask and option that torch's takes
(attn_mask 2-D or 3-D, bool or float; key_padding_mask; need_weights and average_attn_weights;
is_causal; dropout; batch_first; unbatched input).  Self-attention (query, key and value the same
tensor: ViT and encoder blocks, decoder self-attention) calls ``in_proj`` on it.  In
cross-attention the packed weight's q, k and v rows see different inputs, with different row
counts, which one layer's factors cannot hold: those projections stay functional and gather
nothing (the optimizer's warning about layers that got gradients without being called names
``in_proj``), while ``out_proj`` is still called.  Modules with separate q/k/v weights
(kdim/vdim), bias_k/bias_v or add_zero_attn are left as they are, with a warning.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class InProjection(nn.Module):
    """x @ in_proj_weight^T + in_proj_bias of the attention that owns it: (..., E) -> (..., 3E).
    It holds no parameters: ``weight`` and ``bias`` are its owner's."""

    def __init__(self, owner: nn.MultiheadAttention):
        super().__init__()
        object.__setattr__(self, "_owner", owner)     # a plain reference, not a submodule

    @property
    def weight(self) -> nn.Parameter:
        return self._owner.in_proj_weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self._owner.in_proj_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A bool mask (True = masked out) as 0 / -inf in ``dtype``; a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


class ExposedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention that calls its ``out_proj`` module, and its ``in_proj`` module in
    self-attention (NOTE: [exposed attention]).  Made by ``expose_attention``, not constructed
    directly."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:         # torch's forward raises its own error
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        self_attention = query is key and key is value
        batched = query.dim() == 3
        # torch's layout, (length, batch, E)
        q, k, v = (t if batched else t.unsqueeze(0 if self.batch_first else 1)
                   for t in (query, key, value))
        if self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        n_q, n_b, e = q.shape
        n_k, h = k.shape[0], self.num_heads
        hd = e // h
        if self_attention:
            q, k, v = self.in_proj(q).chunk(3, dim=-1)
        else:       # the chunks of the packed weight see three inputs: functional, no statistics
            bias = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = (F.linear(t, w, b) for t, w, b in
                       zip((q, k, v), self.in_proj_weight.chunk(3), bias))
        # (length, N, E) -> (N, H, length, hd)
        q, k, v = (t.reshape(t.shape[0], n_b, h, hd).permute(1, 2, 0, 3) for t in (q, k, v))
        # one additive mask broadcast to (N, H, L, S); is_causal is a hint that attn_mask is causal
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.reshape(n_b, h, n_q, n_k) if mask.dim() == 3 else mask
        pad = _additive(key_padding_mask, q.dtype)
        if pad is not None:
            pad = pad.reshape(n_b, 1, 1, n_k)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q / math.sqrt(hd)) @ k.transpose(-2, -1)
            w = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            w = F.dropout(w, p) if p > 0 else w
            out = w @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, p)
            w = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(n_q * n_b, e)).reshape(n_q, n_b, e)
        if self.batch_first:
            out = out.transpose(0, 1)
        if w is not None and average_attn_weights:
            w = w.mean(dim=1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            w = None if w is None else w.squeeze(0)
        return out, w


def expose_attention(model: nn.Module) -> List[str]:
    """Change every nn.MultiheadAttention in ``model`` (exactly that class) to
    ``ExposedMultiheadAttention`` in place, so that AdaFisher preconditions its projections; call
    it before making the optimizer (and before torch.compile or DDP wrap the model).  Returns the
    names of the modules changed; those it cannot change (separate q/k/v weights, bias_k/bias_v,
    add_zero_attn) are named in a warning (NOTE: [exposed attention])."""
    changed, left = [], []
    for name, m in model.named_modules():
        if type(m) is not nn.MultiheadAttention:
            continue
        why = [what for what, on in (("kdim/vdim", not m._qkv_same_embed_dim),
                                     ("add_bias_kv", m.bias_k is not None),
                                     ("add_zero_attn", m.add_zero_attn)) if on]
        if why:
            left.append(f"{name or '<root>'} ({', '.join(why)})")
            continue
        m.__class__ = ExposedMultiheadAttention
        m.in_proj = InProjection(m)
        changed.append(name or "<root>")
    if left:
        warnings.warn(f"expose_attention: left {', '.join(left)} as they are: separate q/k/v "
                      f"weights (kdim/vdim), add_bias_kv and add_zero_attn are not supported, so "
                      f"their projections get no curvature", stacklevel=2)
    return changed
