"""The workloads' shapes (SPEC section 8), taken from the models in ``models.py``.

GPU mode: every conv layer of ResNet-50 at batch 64 x 224x224 and of ResNet-18 (CIFAR) at batch
256 x 32x32; the Linear layers of a GPT-2-small block at 16 x 1024 tokens.  Smoke mode: the same
code on tiny models (width 8, batch 2, 16x16 / 32x32 inputs, d=32, 16 tokens).
Identical shapes are merged into one case, labelled with the layers that share it.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import Dict, List, Tuple

from . import models


def _conv_geometry(m):
    pad = [(p, p) for p in m.padding]
    return tuple(m.kernel_size), tuple(m.stride), pad, tuple(m.dilation), m.groups


@lru_cache(maxsize=None)
def conv_cases(smoke: bool) -> List[Dict]:
    """[{label, x_shape, kernel_size, stride, padding, dilation, groups, out_shape, layers}]."""
    if smoke:
        nets = [("r50", models.resnet50(width=8), (2, 3, 32, 32)),
                ("r18", models.resnet18_cifar(width=8), (2, 3, 16, 16))]
    else:
        nets = [("r50", models.resnet50(), (64, 3, 224, 224)),
                ("r18", models.resnet18_cifar(), (256, 3, 32, 32))]
    merged: "OrderedDict[tuple, Dict]" = OrderedDict()
    for net, model, inp in nets:
        for name, m, xs in models.conv_layers(model, inp):
            k, s, pad, dil, g = _conv_geometry(m)
            key = (net, xs, k, s, tuple(pad), dil, g)     # H does not depend on out_channels
            ho = [(xs[2 + i] + 2 * pad[i][0] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
            if key not in merged:
                merged[key] = dict(net=net, x_shape=xs, kernel_size=k, stride=s, padding=pad,
                                   dilation=dil, groups=g, out_shapes=[], layers=[])
            merged[key]["layers"].append(name)
            merged[key]["out_shapes"].append((xs[0], m.out_channels, *ho))
    out = []
    for c in merged.values():
        b, ch, hh, ww = c["x_shape"]
        n = len(c["layers"])
        c["label"] = (f"{c['net']} {c['layers'][0]}{f' (x{n})' if n > 1 else ''} "
                      f"{b}x{ch}x{hh}x{ww} k{c['kernel_size'][0]}s{c['stride'][0]}")
        # SPEC section 8 anchors: the released code's im2col vs one read of x on an H100
        c["anchor"] = ANCHOR_CONV.get((b, ch, hh, ww, c["kernel_size"][0], c["stride"][0]))
        out.append(c)
    return out


# (B, C, H, W, k, stride) -> (im2col ms, x.square().sum ms), measured with the released code
ANCHOR_CONV = {(64, 64, 56, 56, 3, 1): (3.76, 0.074), (256, 64, 32, 32, 3, 1): (5.67, 0.094)}


@lru_cache(maxsize=None)
def conv_out_cases(smoke: bool) -> List[Tuple[str, Tuple[int, ...]]]:
    """[(label, shape)] of the conv output gradients (the S statistic: linear_stats, dim=1)."""
    merged: "OrderedDict[tuple, List[str]]" = OrderedDict()
    for c in conv_cases(smoke):
        for name, shp in zip(c["layers"], c["out_shapes"]):
            merged.setdefault((c["net"], shp), []).append(name)
    return [(f"{net} {names[0]}{f' (x{len(names)})' if len(names) > 1 else ''}.s "
             f"{'x'.join(map(str, shp))}", shp) for (net, shp), names in merged.items()]


def gpt_linear_cases(smoke: bool) -> List[Tuple[str, Tuple[int, ...]]]:
    """[(label, tensor shape)] of the H inputs and S output gradients of a GPT-2-small block's
    Linear layers (c_attn, c_proj, fc, proj) at 16 x 1024 tokens, identical shapes merged."""
    b, t, d = (2, 16, 32) if smoke else (16, 1024, 768)
    raw = [("c_attn.x", d), ("c_proj.x", d), ("fc.x", d), ("proj.x", 4 * d),
           ("c_attn.s", 3 * d), ("c_proj.s", d), ("fc.s", 4 * d), ("proj.s", d)]
    merged: "OrderedDict[int, List[str]]" = OrderedDict()
    for name, f in raw:
        merged.setdefault(f, []).append(name)
    return [(f"gpt2 {'/'.join(names)} {b}x{t}x{f}", (b, t, f)) for f, names in merged.items()]
