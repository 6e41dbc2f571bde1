"""``expose_attention``: nn.MultiheadAttention with its projections as module calls.

torch's nn.MultiheadAttention computes its q/k/v projection with its bare ``in_proj_weight`` and
multiplies by ``out_proj.weight`` without calling ``out_proj``, so no module hook sees either and
both step without curvature (README, "Only module calls are seen").  ``expose_attention(model)``
changes the class of each such module in place to ``ExposedMultiheadAttention``, whose forward
computes the same attention but calls its q/k/v projections as child modules holding no
parameters of their own (``InProjection``) and ``out_proj`` as a module: the optimizer then
preconditions both.  The parameters stay where they are, so state_dict keys, pretrained weights
and checkpoints are unchanged.

NOTE: [exposed attention] The exposed forward takes every mask and option that torch's takes
(attn_mask 2-D or 3-D, bool or float; key_padding_mask; need_weights and average_attn_weights;
is_causal; dropout; batch_first; unbatched input; kdim/vdim; add_bias_kv; add_zero_attn).  The
q, k and v projections are one layer (``InProjectionKind``): H holds three blocks, the second
moments of the query's, the key's and the value's features, and S the 3E output rows, so
F[r, c] = S'[r] * H'[block(r), c] + Lambda, min-max normalised together as one layer's (a
grouped 1x1 convolution with three groups has this F).  Self-attention (query, key and value the
same tensor: ViT and encoder blocks, decoder self-attention) calls the ``in_proj`` child once
with the packed weight, which adds its input's statistics to all three blocks; otherwise
(cross-attention, kdim/vdim) the children ``in_proj_q``, ``in_proj_k`` and ``in_proj_v`` project
one input each, aliases of ``in_proj`` that add to their own block.  Query and key may differ in
length, so a call adds its per-sequence means (sums over its rows / its length) and counts the
sequences of its batch (the q call's, once): each block holds the mean over its own rows.  Over
calls of different lengths this weighs sequences, not rows, alike.  add_bias_kv's learned key and
value are bare parameters, appended after the projections: they stay factor-free.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _owners(name: str) -> property:
    """The owner's attribute ``name``, read as a property of an ``InProjection``."""
    return property(lambda self: getattr(self._owner, name))


class InProjection(nn.Module):
    """The q/k/v projections of the attention that owns it; it holds no parameters (the
    properties below are its owner's).  ``block`` None: all three on one input with the packed
    weight, (L, N, E) -> (L, N, 3E); 0, 1 or 2: the q, k or v projection alone, (L, N, E), (L, N,
    kdim) or (L, N, vdim) -> (L, N, E)."""

    def __init__(self, owner: nn.MultiheadAttention, block: Optional[int] = None):
        super().__init__()
        object.__setattr__(self, "_owner", owner)     # a plain reference, not a submodule
        self.block = block

    weight = _owners("in_proj_weight")          # the packed (3E, E) weight, or None
    q_proj_weight = _owners("q_proj_weight")    # separate weights (kdim/vdim), or None
    k_proj_weight = _owners("k_proj_weight")
    v_proj_weight = _owners("v_proj_weight")
    bias = _owners("in_proj_bias")

    def widths(self) -> Tuple[int, int, int]:
        """The input features of the q, k and v projections: (E, kdim, vdim)."""
        o = self._owner
        return o.embed_dim, o.kdim, o.vdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return F.linear(x, self.weight, self.bias)
        b = self.block
        w = (self.weight.chunk(3)[b] if self.weight is not None else
             (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[b])
        return F.linear(x, w, None if self.bias is None else self.bias.chunk(3)[b])


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A bool mask (True = masked out) as 0 / -inf in ``dtype``; a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


def _check_masks(attn_mask, key_padding_mask, query, key, heads, batch_first, batched) -> None:
    """torch's checks of the masks' dtypes and shapes, in torch's words: the exposed forward
    would otherwise read a malformed mask silently (an integer mask added to the scores, a
    transposed one reshaped where the sizes fit) where torch's raises."""
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and m.dtype != torch.bool and not m.is_floating_point():
            raise AssertionError(f"only bool and floating types of {name} are supported")
    seq = 1 if batch_first and batched else 0
    n_q, n_s = query.shape[seq], key.shape[seq]
    n_b = query.shape[1 - seq] if batched else 1
    if key_padding_mask is not None and batched and tuple(key_padding_mask.shape) != (n_b, n_s):
        raise AssertionError(f"expecting key_padding_mask shape of {(n_b, n_s)}, but got "
                             f"{tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        want = (n_q, n_s) if attn_mask.dim() == 2 else (n_b * heads, n_q, n_s)
        if tuple(attn_mask.shape) != want:
            raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is "
                               f"{tuple(attn_mask.shape)}, but should be {want}.")


class ExposedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention that calls its q/k/v projections and its ``out_proj`` as modules
    (NOTE: [exposed attention]).  Made by ``expose_attention``, not constructed directly."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # without autograd nothing gathers statistics: torch's forward, with its fast paths for
        # inference (also where grad is on but nothing needs it: a frozen encoder before a
        # trained head, whose nested-tensor input only those paths take); and is_causal without
        # attn_mask gets torch's own error
        if not torch.is_grad_enabled() or (is_causal and attn_mask is None) or \
                any(t.is_nested for t in (query, key, value)) or not (
                    any(t.requires_grad for t in (query, key, value)) or
                    any(p.requires_grad for p in self.parameters())):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        _check_masks(attn_mask, key_padding_mask, query, key, self.num_heads, self.batch_first,
                     batched)
        packed = query is key and key is value and self._qkv_same_embed_dim
        # torch's layout, (length, batch, features)
        q, k, v = (t if batched else t.unsqueeze(0 if self.batch_first else 1)
                   for t in (query, key, value))
        if self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        n_q, n_b, e = q.shape
        h = self.num_heads
        hd = e // h
        if packed:
            q, k, v = self.in_proj(q).chunk(3, dim=-1)
        else:
            q, k, v = self.in_proj_q(q), self.in_proj_k(k), self.in_proj_v(v)
        if self.bias_k is not None:                 # one more key and value, learned
            k = torch.cat([k, self.bias_k.expand(1, n_b, e)])
            v = torch.cat([v, self.bias_v.expand(1, n_b, e)])
        # (length, N, E) -> (N, H, length, hd)
        q, k, v = (t.reshape(t.shape[0], n_b, h, hd).permute(1, 2, 0, 3) for t in (q, k, v))
        if self.add_zero_attn:                      # one more key and value, zero
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
        n_k = k.shape[2]
        extra = (0, int(self.bias_k is not None) + int(self.add_zero_attn))   # keys not masked
        # torch passes the causal hint on to SDPA when no mask need be merged with attn_mask;
        # otherwise the hint only says that attn_mask is causal
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = F.pad(mask, extra)
            mask = mask.reshape(n_b, h, n_q, n_k) if mask.dim() == 3 else mask
        pad = _additive(key_padding_mask, q.dtype)
        if pad is not None:
            pad = F.pad(pad, extra).reshape(n_b, 1, 1, n_k)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q / math.sqrt(hd)) @ k.transpose(-2, -1)
            w = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            w = F.dropout(w, p) if p > 0 else w
            out = w @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=causal)
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
    names of the modules changed (NOTE: [exposed attention])."""
    changed = []
    for name, m in model.named_modules():
        if type(m) is not nn.MultiheadAttention:
            continue
        m.__class__ = ExposedMultiheadAttention
        # in_proj first: the layer, whose aliases the others are (NOTE: [shared parameters])
        for child, block in (("in_proj", None), ("in_proj_q", 0), ("in_proj_k", 1), ("in_proj_v", 2)):
            m.add_module(child, InProjection(m, block))
        changed.append(name or "<root>")
    return changed
