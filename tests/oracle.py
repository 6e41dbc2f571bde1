"""Independent float64 oracle of AdaFisher / AdaFisherW (SPEC section 2), both presets.

Written from the SPEC formulas alone; imports nothing from ``adafisher_fast``.  Slow and simple on
purpose: conv patches are extracted explicitly (padding with ``F.pad``, then ``Tensor.unfold`` per
spatial dim), the layer input x and output gradient s are captured with plain forward hooks plus
``retain_grad`` on the outputs, and the update is an explicit per-parameter loop.
"""
import itertools
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

D64 = torch.float64

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORM = BN + (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def oracle_kinds(preset):
    if preset == "official":
        return (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)
    return (nn.Linear,) + CONV + CONVT + NORM + (nn.Embedding,)


def hooked(module, preset):
    """Does this module get factors under the preset (type match exact, as the released code)."""
    kinds = oracle_kinds(preset)
    if type(module) not in kinds:
        return False
    return any(True for _ in module.parameters(recurse=False))


# ----------------------------------------------------------------------------------------------
# capture of x (module input) and s (gradient of the loss w.r.t. the module output)
# ----------------------------------------------------------------------------------------------
class Capture:
    """Forward hooks storing the input and the output (retain_grad) of every listed module."""

    def __init__(self, model, preset):
        self.handles = []
        self.rec: Dict[str, list] = {}
        self.modules = {}
        for name, m in model.named_modules():
            if hooked(m, preset):
                self.modules[name] = m
                self.handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(mod, inp, out):
            if not torch.is_grad_enabled():
                return
            out.retain_grad()
            self.rec.setdefault(name, []).append((inp[0].detach().clone(), out, mod.training))
        return fn

    def calls(self):
        """{name: [(x, s, training)]} after backward."""
        res = {}
        for name, lst in self.rec.items():
            res[name] = [(x, out.grad.detach().clone() if out.grad is not None else torch.zeros_like(out), tr)
                         for x, out, tr in lst]
        return res

    def clear(self):
        self.rec = {}

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# conv patches
# ----------------------------------------------------------------------------------------------
def _tup(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_pads(m, nd, dilation):
    """Per-dim (left, right) padding the layer applies, for the given dilation."""
    k = _tup(m.kernel_size, nd)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [(0, 0)] * nd
        res = []
        for d in range(nd):
            total = dilation[d] * (k[d] - 1)
            left = total // 2
            res.append((left, total - left))
        return res
    p = _tup(m.padding, nd)
    return [(p[d], p[d]) for d in range(nd)]


def conv_patches(x, m, official):
    """Patches P of shape (B, g, L, D), D in (channel, kernel...) order.

    official: dilation treated as 1 and zero padding (the layer's padding numbers)."""
    nd = x.dim() - 2
    k = _tup(m.kernel_size, nd)
    st = _tup(m.stride, nd)
    dil = (1,) * nd if official else _tup(m.dilation, nd)
    pads = conv_pads(m, nd, _tup(m.dilation, nd))   # the layer's real padding numbers
    flat = []
    for d in reversed(range(nd)):
        flat += [pads[d][0], pads[d][1]]
    mode = "zeros" if official else m.padding_mode
    if mode == "zeros":
        xp = F.pad(x, flat, mode="constant", value=0.0)
    else:
        xp = F.pad(x, flat, mode=mode)
    t = xp
    for d in range(nd):
        span = dil[d] * (k[d] - 1) + 1
        t = t.unfold(2 + d, span, st[d])          # adds a trailing dim of size span
    # t: (B, C, L1..Lnd, span1..spannd): subsample every dilation
    idx = [slice(None)] * (2 + nd)
    for d in range(nd):
        idx.append(slice(None, None, dil[d]))
    t = t[tuple(idx)]
    B, C = x.shape[:2]
    Ls = t.shape[2:2 + nd]
    L = int(math.prod(Ls))
    g = m.groups
    t = t.reshape(B, g, C // g, L, *k)
    t = t.movedim(3, 2)                             # (B, g, L, C/g, k...)
    return t.reshape(B, g, L, (C // g) * int(math.prod(k)))


def transposed_conv_patches(x, s, m):
    """P (B, C_out, prod(k), *x's spatial) of a transposed conv: P[b, o, k, l] is the element of
    the zero-padded output gradient that input position l reaches through kernel offset k,
    s_pad[b, o, l * stride + k * dilation] per dim (test_transposed_conv_patches_give_the_weight_grad
    checks that they give the weight gradient)."""
    nd = x.dim() - 2
    flat = []
    for d in reversed(range(nd)):
        flat += [m.padding[d], m.padding[d]]
    sp = F.pad(s, flat)
    cols = []
    for offs in itertools.product(*[range(k) for k in m.kernel_size]):
        idx = tuple(slice(o * dl, o * dl + st * (n - 1) + 1, st)
                    for o, dl, st, n in zip(offs, m.dilation, m.stride, x.shape[2:]))
        cols.append(sp[(slice(None), slice(None)) + idx])
    return torch.stack(cols, dim=2)


# ----------------------------------------------------------------------------------------------
# raw statistics of one call
# ----------------------------------------------------------------------------------------------
def norm_xhat(m, x, training):
    """Normalised activation before the affine transform, statistics as the layer uses them."""
    if isinstance(m, BN):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if training or m.running_mean is None:      # torch's rule: running buffers in eval mode
            mu = x.mean(dim=dims, keepdim=True)
            var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
        else:
            mu = m.running_mean.to(x.dtype).view(shape)
            var = m.running_var.to(x.dtype).view(shape)
        return (x - mu) / torch.sqrt(var + m.eps)
    if isinstance(m, nn.LayerNorm):
        nd = len(m.normalized_shape)
        dims = list(range(x.dim() - nd, x.dim()))
        mu = x.mean(dim=dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
        return (x - mu) / torch.sqrt(var + m.eps)
    if isinstance(m, nn.RMSNorm):
        nd = len(m.normalized_shape)
        dims = list(range(x.dim() - nd, x.dim()))
        # eps=None: torch normalises half inputs in float32, with float32's epsilon
        eps = m.eps if m.eps is not None else torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        return x / torch.sqrt((x ** 2).mean(dim=dims, keepdim=True) + eps)
    if isinstance(m, nn.GroupNorm):
        B, C = x.shape[:2]
        xg = x.reshape(B, m.num_groups, -1)
        mu = xg.mean(dim=2, keepdim=True)
        var = ((xg - mu) ** 2).mean(dim=2, keepdim=True)
        return ((xg - mu) / torch.sqrt(var + m.eps)).reshape(x.shape)
    raise TypeError(type(m))


def raw_one(m, x, s, preset, training=True):
    """(H, S) of one forward/backward call (SPEC section 2), float64."""
    x = x.to(D64)
    s = s.to(D64)
    has_bias = getattr(m, "bias", None) is not None
    if isinstance(m, nn.Linear):
        xr = x.reshape(-1, x.shape[-1])
        sr = s.reshape(-1, s.shape[-1])
        R = xr.shape[0]
        H = (xr ** 2).sum(0) / R
        if has_bias:
            H = torch.cat([H, torch.ones(1, dtype=D64)])
        S = (sr ** 2).sum(0) / R
        return H, S
    if isinstance(m, CONV):
        official = preset == "official"
        P = conv_patches(x, m, official)                  # (B, g, L, D)
        B, g, L, D = P.shape
        sr = s.reshape(s.shape[0], s.shape[1], -1)
        Ls = sr.shape[2]
        S = (sr ** 2).sum(dim=(0, 2)) / (B * Ls)
        if official:
            H = (P ** 2).sum(dim=(0, 1, 2)) / (B * L * D)
            if has_bias:
                H = torch.cat([H, torch.tensor([g / D], dtype=D64)])
            return H, S
        Hg = (P ** 2).sum(dim=(0, 2)) / (B * L)              # (g, D)
        if has_bias:
            Hg = torch.cat([Hg, torch.ones(g, 1, dtype=D64)], dim=1)
        return Hg.reshape(-1), S
    if isinstance(m, CONVT):
        B, c_out, g = s.shape[0], s.shape[1], m.groups
        P = transposed_conv_patches(x, s, m)             # (B, C_out, K, *L_in)
        L = math.prod(x.shape[2:])
        Sg = (P.reshape(B, g, -1, L) ** 2).sum(dim=(0, 3)) / (B * L)     # (g, C_out/g * K)
        S = Sg.reshape(-1)
        H = (x.transpose(0, 1).reshape(x.shape[1], -1) ** 2).mean(1)
        if has_bias:
            H = torch.cat([H, torch.ones(1, dtype=D64)])
            S = torch.cat([S, (s.transpose(0, 1).reshape(c_out, -1) ** 2).mean(1)])
        return H, S
    if isinstance(m, nn.Embedding):
        idx = x.reshape(-1).long()
        T = idx.numel()
        H = torch.zeros(m.num_embeddings, dtype=D64)
        for v in idx.tolist():
            H[v] += 1.0
        H = H / T
        sr = s.reshape(-1, s.shape[-1])
        S = (sr ** 2).sum(0) / T
        return H, S
    if preset == "official":
        if isinstance(m, nn.BatchNorm2d):
            B, C, Hh, W = x.shape
            u = x.sum(dim=(0, 2, 3)) / (Hh * W) ** 2
            H = torch.stack([(u ** 2).sum(), torch.tensor(float(C), dtype=D64)]) / B ** 2
            S = s.sum(dim=(0, 2, 3)) ** 2 / B
            return H, S
        if isinstance(m, nn.LayerNorm):
            B = x.shape[0]
            red = [d for d in range(x.dim()) if d != 1]
            M = 1
            for d in red:
                if d != 0:
                    M *= x.shape[d]
            u = x.sum(dim=red) / M ** 2
            H = torch.stack([(u ** 2).sum(), torch.tensor(float(x.shape[1]), dtype=D64)]) / B ** 2
            S = s.reshape(-1, s.shape[-1]).sum(0) ** 2 / B
            return H, S
        raise TypeError(type(m))
    # paper, normalisation layers
    xh = norm_xhat(m, x, training)
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        n = int(math.prod(m.normalized_shape))
        Hw = (xh.reshape(-1, n) ** 2).mean(0)
        S = (s.reshape(-1, n) ** 2).mean(0)
    else:
        C = x.shape[1]
        Hw = (xh.transpose(0, 1).reshape(C, -1) ** 2).mean(1)
        S = (s.transpose(0, 1).reshape(C, -1) ** 2).mean(1)
    if has_bias:
        H = torch.cat([Hw, torch.ones_like(Hw)])
    else:
        H = Hw
    return H, S


def raw_stats_from_calls(model, calls, preset):
    """{name: (H, S)} from Capture.calls(); several calls of a module add up."""
    mods = dict(model.named_modules())
    out = {}
    for name, lst in calls.items():
        m = mods[name]
        H = S = None
        for x, s, tr in lst:
            h, sv = raw_one(m, x, s, preset, tr)
            H = h if H is None else H + h
            S = sv if S is None else S + sv
        out[name] = (H, S)
    return out


# ----------------------------------------------------------------------------------------------
# EMA, normalisation, factors
# ----------------------------------------------------------------------------------------------
def minmax(v):
    v = v.clone()
    v[v == float("inf")] = 1.0
    v[v == float("-inf")] = 0.0
    return (v - v.min()) / (v.max() - v.min() + 1e-6)


def ema_update(state, raw, preset, gamma):
    """New EMA state of one vector (state None = no statistics yet)."""
    if preset == "official":
        if state is None:
            state = torch.ones_like(raw)
        return state * (gamma / 10) + minmax(raw) * (gamma / 100)
    if state is None:
        return raw.clone()
    return gamma * raw + (1 - gamma) * state


def factors(state_H, state_S, preset):
    if preset == "official":
        return state_H, state_S
    return minmax(state_H), minmax(state_S)


def param_F(m, pname, p, Hp, Sp, Lambda):
    """F of one parameter of a hooked module, given H', S'."""
    if isinstance(m, nn.Linear):
        if pname == "weight":
            return Sp[:, None] * Hp[None, :m.in_features] + Lambda
        return Sp * Hp[-1] + Lambda
    if isinstance(m, CONV):
        out = m.weight.shape[0]
        D = m.weight[0].numel()
        if Hp.numel() == D + (1 if m.bias is not None else 0):    # official: one H for all groups
            if pname == "weight":
                return (Sp[:, None] * Hp[None, :D] + Lambda).reshape(p.shape)
            return Sp * Hp[-1] + Lambda
        g = m.groups
        Hg = Hp.reshape(g, -1)
        grp = torch.arange(out) // (out // g)
        if pname == "weight":
            return (Sp[:, None] * Hg[grp, :D] + Lambda).reshape(p.shape)
        assert Hg.shape[1] == D + 1
        return Sp * Hg[grp, D] + Lambda
    if isinstance(m, CONVT):
        c_in, D, g = m.weight.shape[0], m.weight[0].numel(), m.groups
        if pname == "weight":
            grp = torch.arange(c_in) // (c_in // g)
            return (Hp[:c_in, None] * Sp[:g * D].reshape(g, D)[grp] + Lambda).reshape(p.shape)
        return Sp[g * D:] * Hp[c_in] + Lambda
    if isinstance(m, nn.Embedding):
        return Hp[:, None] * Sp[None, :] + Lambda
    # normalisation layers
    if Hp.numel() == 2:                                      # official BatchNorm2d / LayerNorm
        # S has one entry per element of the last dim; it broadcasts against the parameter
        return torch.broadcast_to(Sp * Hp[0 if pname == "weight" else 1] + Lambda, p.shape)
    n = p.numel()
    if pname == "weight":
        return (Sp * Hp[:n] + Lambda).reshape(p.shape)
    return (Sp * Hp[n:2 * n] + Lambda).reshape(p.shape)


# ----------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------
class OracleOpt:
    def __init__(self, model, lr=1e-3, beta=0.9, Lambda=1e-3, gamma=0.8, TCov=100, weight_decay=0.0,
                 preset="official", decoupled=False):
        self.model = model
        self.lr, self.beta, self.Lambda, self.gamma = lr, beta, Lambda, gamma
        self.TCov, self.wd, self.preset, self.decoupled = TCov, weight_decay, preset, decoupled
        self.steps = 0
        self.m = {}
        self.t = {}
        self.ema: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.cap = Capture(model, preset)

    def zero_grad(self):
        for p in self.model.parameters():
            p.grad = None
        self.cap.clear()

    def stats_now(self):
        return self.steps % self.TCov == 0

    @torch.no_grad()
    def step(self):
        if self.stats_now():
            raw = raw_stats_from_calls(self.model, self.cap.calls(), self.preset)
            for name, (H, S) in raw.items():
                old = self.ema.get(name)
                self.ema[name] = (ema_update(None if old is None else old[0], H, self.preset, self.gamma),
                                  ema_update(None if old is None else old[1], S, self.preset, self.gamma))
        self.cap.clear()
        Fs = {}
        for name, m in self.model.named_modules():
            if not hooked(m, self.preset):
                continue
            for pname, p in m.named_parameters(recurse=False):
                if name in self.ema:
                    Hp, Sp = factors(*self.ema[name], self.preset)
                    Fs[id(p)] = param_F(m, pname, p, Hp, Sp, self.Lambda)
                else:
                    Fs[id(p)] = torch.full_like(p, 1.0 + self.Lambda)
        other = 1.0 if self.preset == "official" else 1.0 + self.Lambda
        for p in self.model.parameters():
            if p.grad is None or not p.requires_grad:
                continue
            g = p.grad.clone()
            if not self.decoupled and self.wd != 0:
                g = g + self.wd * p
            k = id(p)
            self.t[k] = self.t.get(k, 0) + 1
            m = self.m.get(k, torch.zeros_like(p))
            m = self.beta * m + (1 - self.beta) * g
            self.m[k] = m
            mhat = m / (1 - self.beta ** self.t[k])
            Fp = Fs.get(k, other)
            if self.decoupled:
                p.sub_(self.lr * (mhat / Fp + self.wd * p))
            else:
                p.sub_(self.lr * mhat / Fp)
        self.steps += 1


def trajectory(model, batches, loss_fn, **kw):
    """Train ``model`` (in place) with the oracle; returns [ {param name: tensor} after each step ]."""
    opt = OracleOpt(model, **kw)
    out = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    opt.cap.remove()
    return out, opt
