"""The registry of layer kinds: the one place that says, per module type and preset,

* the layout of its raw H (activation side) and S (output-gradient side) statistics
  (``factors``: accumulator size and the terms that turn accumulators into H/S, SPEC section 2),
* how to accumulate them from the module input / output gradient (``h_stats`` / ``s_stats``, which
  call the backend's ops and return the number of rows they added),
* how each parameter maps to (row, column) of F (``param_maps``, NOTE: [param map] in reference.py).

Lookup walks the module's class hierarchy, so subclasses inherit their parent's entry and users add a
layer kind with ``@register_layer(MyModule)`` (or the type's name, "module.QualName") on a
``LayerKind`` subclass, without editing the package.
"""
from __future__ import annotations

import fnmatch
import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module as reparametrize

from .attention import InProjection
from .reference import conv_out_size

# (src, dst, pow, coef, q): raw[dst] += acc[src] ** pow * coef / count ** q  (LayerTable docstring)
Term = Tuple[int, int, int, float, int]
# rows, cols, s_off, s_r, s_c, h_off, h_r, h_c, h_gr, h_gs with offsets from the start of the layer's
# S / H (NOTE: [param map] in reference.py)
ParamMap = Tuple[int, int, int, int, int, int, int, int, int, int]


@dataclass
class FactorSpec:
    """Layout of one factor (H or S) of a layer: ``acc_size`` accumulator entries, ``size`` raw
    entries, the ``terms`` mapping one to the other.  ``grad_degree`` is the power of the output
    gradient in the accumulators (0 for H, 2 for sums of squares of s, 1 for plain sums of s): the
    distributed all-reduce divides by world_size ** grad_degree (SPEC section 6)."""
    acc_size: int
    size: int
    terms: List[Term] = field(default_factory=list)
    grad_degree: int = 0


def mean_terms(n: int, dst0: int = 0, coef: float = 1.0) -> List[Term]:
    """raw[dst0 + j] = coef * acc[j] / count for j < n."""
    return [(j, dst0 + j, 1, coef, 1) for j in range(n)]


def const_term(dst: int, value: float, q: int = 0) -> Term:
    """raw[dst] += value / count ** q (pow 0 ignores the accumulator it names)."""
    return (0, dst, 0, float(value), q)


def matrix_map(rows: int, cols: int, transposed: bool = False, groups: int = 1,
               h_group: int = 0) -> ParamMap:
    """A (rows, cols) weight whose element (r, c) uses S[r] and H[c] (Linear: out x in), or, with
    ``transposed``, H[r] and S[c] (Embedding; weights stored in x out).  With ``groups`` equal
    groups of rows, not transposed: H[group(r) * h_group + c] (a grouped conv's H per group)."""
    if transposed:
        return (rows, cols, 0, 0, 1, 0, 1, 0, rows, 0)
    return (rows, cols, 0, 1, 0, 0, 0, 1, rows // groups, h_group)


def cross_matrix_map(rows: int, cols: int, h_size: int, groups: int = 1) -> ParamMap:
    """A (rows, cols) weight whose element (r, c) uses H[r] and S[group(r) * cols + c], with
    ``groups`` equal groups of rows (a transposed conv's weight, C_in x D).  F is a product, so
    the sides may cross (NOTE: [param map] in reference.py): the S-side columns reach H[r] from
    S's start (-h_size, the size of the layer's H), and the H-side ones S with the group term."""
    return (rows, cols, -h_size, 1, 0, h_size, 0, 1, rows // groups, cols if groups > 1 else 0)


def row_map(rows: int, s_off: int = 0, h_off: int = 0, h_r: int = 1, groups: int = 1,
            h_group: int = 0) -> ParamMap:
    """A vector parameter whose element r uses S[s_off + r] and H[h_off + r * h_r], plus
    group(r) * h_group with ``groups`` equal groups of rows."""
    return (rows, 1, s_off, 1, 0, h_off, h_r, 0, rows // groups, h_group)


class LayerKind:
    """Base class of a registry entry.  Subclasses fill in the four methods below."""
    #: layer kinds the authors' released code hooks (the others keep F = 1 under preset="official")
    released: Tuple[type, ...] = ()
    #: hooked under both presets all the same (a Linear layer in another form)
    all_presets: bool = False

    def supported(self, module: nn.Module, preset) -> bool:
        return (self.all_presets or not preset.only_released_layers
                or isinstance(module, self.released))

    def factors(self, module: nn.Module, preset) -> Tuple[FactorSpec, FactorSpec]:
        raise self._missing("factors")

    def param_maps(self, module: nn.Module, preset) -> Dict[str, ParamMap]:
        raise self._missing("param_maps")

    def h_stats(self, module: nn.Module, x: torch.Tensor, acc: torch.Tensor, preset, ops) -> int:
        raise self._missing("h_stats")

    def s_stats(self, module: nn.Module, s: torch.Tensor, acc: torch.Tensor, preset, ops) -> int:
        raise self._missing("s_stats")

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(f"AdaFisher: layer kind {type(self).__name__} does not define "
                                   f"{method}; a LayerKind defines factors, param_maps, h_stats "
                                   f"and s_stats")

    def probe(self, module: nn.Module) -> bool:
        """Called for each module at construction, where a kind may try the module's class on
        probe inputs (``probe_call``, ``probe_on_cpu``).  False when its calls cannot be read as
        this kind reads them (an nn.Embedding subclass that looks up positions, not its input):
        the module then gets no hooks and no factors, and the warning at construction names it
        (optional)."""
        return True

    def h_input(self, module: nn.Module, x: torch.Tensor, output) -> Optional[torch.Tensor]:
        """What ``h_stats`` reads of a call with input x and this output: x itself, unless a
        subclass's forward changes the input before the registered operation, or None for a call
        the kind cannot read, which then gathers nothing (optional)."""
        return x

    def s_input(self, module: nn.Module, s: torch.Tensor) -> torch.Tensor:
        """What ``s_stats`` reads of the output gradient s (optional, as ``h_input``)."""
        return s


# submodules that compute a weight or act on the output, not the layer's operation: torch's
# parametrizations, and torch.ao's QAT fake quantisation (its weight_fake_quant is the first
# submodule a qat.Linear calls: the output-gradient hook went on the weight)
_NOT_PARTS = ("parametrizations", "weight_fake_quant", "activation_post_process")


def submodules(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """A hooked module's own (name, submodule) pairs (NOTE: [composite layers] in state.py),
    but for ``_NOT_PARTS``."""
    return [(n, c) for n, c in module.named_children() if n not in _NOT_PARTS]


_REGISTRY: Dict[Union[type, str], LayerKind] = {}


def register_layer(*module_types: Union[type, str]):
    """Class decorator: ``@register_layer(nn.Linear)`` registers one LayerKind instance.  A type
    may also be named "module.QualName", for a library that need not be installed (or imported):
    the module that defines the class, or one that exports it ("timm.layers.LayerScale" for
    timm.layers.layer_scale.LayerScale), found once that module is imported; or by a pattern of
    such names with * wildcards (fnmatch), matched after every exact entry."""
    if not module_types:
        raise TypeError("register_layer needs at least one module type, e.g. "
                        "@register_layer(nn.Linear)")
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module) or
                isinstance(t, str) and "." in t.strip(".")):
            raise TypeError(f"register_layer: {t!r} is neither an nn.Module subclass nor a "
                            f"'module.QualName' string")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, LayerKind)):
            raise TypeError(f"register_layer decorates a LayerKind subclass, got {cls!r}")
        inst = cls()
        for t in module_types:
            _REGISTRY[t] = inst
        return cls
    return deco


def _exported(name: str) -> Optional[type]:
    """The class that the module named by ``name``'s prefix exports under its last part, if that
    module is imported."""
    path, _, attr = name.rpartition(".")
    obj = getattr(sys.modules.get(path), attr, None)
    return obj if isinstance(obj, type) else None


_UNMATCHED_WARNED: set = set()


def warn_unmatched_names() -> None:
    """A name a user registered ("module.QualName") whose module is imported but has no such
    attribute matches nothing, a misspelt name most likely: its modules then take their parent
    type's kind, or none, silently.  Warned once per name, at construction; the package's own
    names are left out (a library version may lack a class they name)."""
    for name, kind in _REGISTRY.items():
        if (not isinstance(name, str) or "*" in name or name in _UNMATCHED_WARNED
                or type(kind).__module__.startswith(__package__ + ".")):
            continue
        path, _, attr = name.rpartition(".")
        if path in sys.modules and not hasattr(sys.modules[path], attr):
            _UNMATCHED_WARNED.add(name)
            warn_user(f"AdaFisher: register_layer({name!r}) ({type(kind).__name__}) matches "
                      f"nothing: {path} is imported and has no {attr!r} (a misspelt name?)")


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    exported, patterns = {}, []
    for name, kind in _REGISTRY.items():
        if isinstance(name, str) and "*" in name:
            patterns.append((name, kind))
        elif isinstance(name, str):
            cls = _exported(name)
            if cls is not None:
                exported.setdefault(cls, kind)
    mro = type(module).__mro__
    for t in mro:
        kind = (_REGISTRY.get(t) or _REGISTRY.get(f"{t.__module__}.{t.__qualname__}") or
                exported.get(t))
        if kind is not None:
            return kind
    for t in mro:
        for pattern, kind in patterns:
            if fnmatch.fnmatchcase(f"{t.__module__}.{t.__qualname__}", pattern):
                return kind
    return None


# frames that a warning skips to reach the caller's line: this package, torch's optimizer and
# no_grad wrappers around step(), and torch.nn's modules (their calls run the hooks)
_OWN_FRAMES = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
               os.path.dirname(os.path.abspath(torch.optim.__file__)) + os.sep,
               os.path.abspath(torch.utils._contextlib.__file__),
               os.path.dirname(os.path.abspath(torch.nn.modules.module.__file__)) + os.sep)


def warn_user(msg: str) -> None:
    """``warnings.warn(msg)`` attributed to the first caller outside this package and torch's
    wrappers of step() (for a hook: the line that called the layer, in the user's model or a
    library's, e.g. timm's): a fixed stacklevel was off wherever the call depth differs (a method
    reached through a wrapper, or from add_param_group rather than the constructor)."""
    level, f = 2, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_OWN_FRAMES):
        f, level = f.f_back, level + 1
    warnings.warn(msg, stacklevel=level)


# ----------------------------------------------------------------------------------------------
@register_layer(nn.Linear)
class LinearKind(LayerKind):
    """H[j] = mean_r x[r, j]^2 (+ bias entry 1), S[o] = mean_r s[r, o]^2; both presets."""
    released = (nn.Linear,)
    transposed = False          # the weight is stored (out, in); (in, out) if True

    def sizes(self, m) -> Tuple[int, int]:
        """(in, out) features."""
        return m.in_features, m.out_features

    def factors(self, m, preset):
        n_in, n_out = self.sizes(m)
        b = int(m.bias is not None)
        h = FactorSpec(n_in, n_in + b, mean_terms(n_in) + ([const_term(n_in, 1.0)] if b else []))
        return h, FactorSpec(n_out, n_out, mean_terms(n_out), 2)

    def param_maps(self, m, preset):
        n_in, n_out = self.sizes(m)
        w = matrix_map(n_in, n_out, transposed=True) if self.transposed else matrix_map(n_out, n_in)
        maps = {"weight": w}
        if m.bias is not None:
            maps["bias"] = row_map(n_out, h_off=n_in, h_r=0)
        return maps

    def h_stats(self, m, x, acc, preset, ops):
        ops.linear_stats(x, acc)
        return x.numel() // x.shape[-1]

    def s_stats(self, m, s, acc, preset, ops):
        ops.linear_stats(s, acc)
        return s.numel() // s.shape[-1]


@register_layer("transformers.pytorch_utils.Conv1D")
class HFConv1DKind(LinearKind):
    """Hugging Face's ``Conv1D`` (GPT-2's projections): y = x @ weight + bias with the weight
    stored (in, out), a Linear layer transposed; matched by name, so transformers stays optional.
    Linear's statistics, so both presets hook it: the released code's Linear formulas are the
    paper's, and left factor-free under "official" (F = 1) a GPT-2's projections would take steps
    1/Lambda times smaller than its LayerNorms'."""
    transposed = True
    all_presets = True

    def sizes(self, m):
        return tuple(m.weight.shape)


@register_layer(InProjection)
class InProjectionKind(LayerKind):
    """The q, k and v projections of an exposed nn.MultiheadAttention, one layer (NOTE: [exposed
    attention] in attention.py).  With (E, kdim, vdim) the projections' input widths and
    w = E + kdim + vdim: H[0:w] = the q, k and v inputs' mean x^2 per feature, one block each (+
    bias entry 1); S[0:3E] = mean s^2 per output row.  A call adds sums over its L x N rows / L
    and counts N, the q call's only (an alias's ``block``).  Both presets hook it, as Conv1D:
    these are Linear layers."""
    all_presets = True

    @staticmethod
    def _blocks(m) -> List[Tuple[int, int]]:
        """The (start, size) in H of the blocks ``m`` adds to."""
        widths = m.widths()
        starts = [0, widths[0], widths[0] + widths[1]]
        return [(starts[b], widths[b]) for b in ((0, 1, 2) if m.block is None else (m.block,))]

    def factors(self, m, preset):
        w, e, b = sum(m.widths()), m.widths()[0], int(m.bias is not None)
        h = FactorSpec(w, w + b, mean_terms(w) + ([const_term(w, 1.0)] if b else []))
        return h, FactorSpec(3 * e, 3 * e, mean_terms(3 * e), 2)

    def param_maps(self, m, preset):
        (e, kd, vd), b = m.widths(), int(m.bias is not None)
        if m.weight is not None:        # packed (3E, E): row r uses H block r // E
            maps = {"weight": matrix_map(3 * e, e, groups=3, h_group=e)}
        else:
            maps = {"q_proj_weight": matrix_map(e, e),
                    "k_proj_weight": _shifted(matrix_map(e, kd), e, e),
                    "v_proj_weight": _shifted(matrix_map(e, vd), 2 * e, e + kd)}
        if b:
            maps["bias"] = row_map(3 * e, h_off=e + kd + vd, h_r=0)
        return maps

    @staticmethod
    def _add_means(m, t: torch.Tensor, acc: torch.Tensor, blocks, ops) -> int:
        """acc[start:start + size] += (sum over t's rows of t^2) / L for each (start, size) in
        ``blocks``; t: (L, N, size).  Returns N for the call that counts (packed or q), else 0."""
        sums = torch.zeros(t.shape[-1], dtype=acc.dtype, device=acc.device)
        ops.linear_stats(t, sums)
        sums /= t.shape[0]
        for start, size in blocks:
            acc[start:start + size].add_(sums)     # (+= on a slice copies it back: a launch)
        return t.shape[1] if m.block in (None, 0) else 0

    def h_stats(self, m, x, acc, preset, ops):
        return self._add_means(m, x, acc, self._blocks(m), ops)

    def s_stats(self, m, s, acc, preset, ops):
        e = m.widths()[0]
        return self._add_means(m, s, acc, [(0, 3 * e)] if m.block is None else [(m.block * e, e)],
                               ops)


def _shifted(mp: ParamMap, s_off: int, h_off: int) -> ParamMap:
    """``mp`` with its S and H indices moved by s_off and h_off."""
    return mp[:2] + (mp[2] + s_off,) + mp[3:5] + (mp[5] + h_off,) + mp[6:]


_WARNED_PADDING: set = set()     # conv classes told about NOTE: [padding inside forward]


def conv_padding(m: nn.modules.conv._ConvNd) -> List[Tuple[int, int]]:
    """(lo, hi) padding per spatial dim, resolving padding='valid' / 'same' as the layer does."""
    return padding_pairs(m.padding, m.kernel_size, m.dilation)


def padding_pairs(padding, kernel_size, dilation) -> List[Tuple[int, int]]:
    """``conv_padding`` of a conv with these attributes."""
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":
        tot = [d * (kk - 1) for d, kk in zip(dilation, kernel_size)]
        return [(t // 2, t - t // 2) for t in tot]
    return [(p, p) for p in padding]


@functools.lru_cache(maxsize=1024)
def _extra_padding(name: str, kernel_size, stride, dilation, padding, size, out_size) -> tuple:
    """F.pad's padding of an input of spatial ``size`` whose conv (the module's geometry)
    returned ``out_size`` (NOTE: [padding inside forward]): () when the geometry gives it."""
    nd = len(kernel_size)
    pad = padding_pairs(padding, kernel_size, dilation)
    extra = []
    for i in range(nd):
        k, st, d = kernel_size[i], stride[i], dilation[i]
        if conv_out_size(size[i], k, st, d, *pad[i]) == out_size[i]:
            extra.append(0)
            continue
        need = (out_size[i] - 1) * st + d * (k - 1) + 1 - size[i] - sum(pad[i])
        if need < 0:
            raise ValueError(
                f"AdaFisher: {name}(kernel_size={kernel_size}, stride={stride}, "
                f"padding={padding}, dilation={dilation}) returned spatial size {out_size} for "
                f"input {size}, smaller than its geometry gives: its forward is not a "
                f"convolution of its input; register a LayerKind for it "
                f"(adafisher_fast.register_layer)")
        extra.append(need)
    return tuple(p for e in reversed(extra) for p in (e // 2, e - e // 2)) if any(extra) else ()


_TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register_layer(*_TORCH_CONVS)
class ConvKind(LayerKind):
    """Patch statistics without im2col; D = C_in/groups * prod(kernel).

    official (Conv2d only): H[j] = sum_{b, group, l} P^2 / (B L D), bias entry groups / D; dilation
    treated as 1 and zero padding, as the released code does.  paper: H[group, j] = mean_{b,l} P^2
    with the layer's true geometry, bias entry 1 per group.  S[o] = mean_{b,l} s[b, o, l]^2.
    """
    released = (nn.Conv2d,)

    @staticmethod
    def _dims(m):
        g = m.groups
        d = (m.in_channels // g) * math.prod(m.kernel_size)
        return g, d, int(m.bias is not None)

    def factors(self, m, preset):
        g, d, b = self._dims(m)
        if preset.only_released_layers:
            terms = [(gi * d + j, j, 1, 1.0 / d, 1) for gi in range(g) for j in range(d)]
            h = FactorSpec(g * d, d + b, terms + ([const_term(d, g / d)] if b else []))
        else:
            terms = [(gi * d + j, gi * (d + b) + j, 1, 1.0, 1) for gi in range(g) for j in range(d)]
            terms += [const_term(gi * (d + b) + d, 1.0) for gi in range(g)] if b else []
            h = FactorSpec(g * d, g * (d + b), terms)
        return h, FactorSpec(m.out_channels, m.out_channels, mean_terms(m.out_channels), 2)

    def param_maps(self, m, preset):
        g, d, b = self._dims(m)
        o = m.out_channels
        per_group = not preset.only_released_layers and g > 1       # H per group (paper)
        groups, h_group = (g, d + b) if per_group else (1, 0)
        maps = {"weight": matrix_map(o, d, groups=groups, h_group=h_group)}
        if b:
            maps["bias"] = row_map(o, h_off=d, h_r=0, groups=groups, h_group=h_group)
        return maps

    def h_stats(self, m, x, acc, preset, ops):
        if preset.only_released_layers:
            dilation, mode = (1,) * len(m.kernel_size), "zeros"
        else:
            dilation, mode = m.dilation, m.padding_mode
        if x.dim() == len(m.kernel_size) + 1:       # unbatched input
            x = x.unsqueeze(0)
        pad = conv_padding(m)
        positions = ops.conv_stats(x, acc, m.kernel_size, m.stride, pad, dilation, m.groups, mode)
        return x.shape[0] * positions

    def s_stats(self, m, s, acc, preset, ops):
        if s.dim() == len(m.kernel_size) + 1:
            s = s.unsqueeze(0)
        ops.linear_stats(s, acc, dim=1)
        return s.numel() // m.out_channels

    def h_input(self, m, x, output):
        """NOTE: [padding inside forward] A subclass may pad in its forward and convolve with
        padding 0: timm's Conv2dSame pads TensorFlow's "SAME" way for each input size.  Its output
        is then larger than the declared geometry gives, and the patches the statistics must see
        are those of the padded input: x is zero-padded by the missing amount, total // 2 before
        (as "SAME" and timm do), with one warning per class.  An output smaller than the declared
        geometry gives is an error: such a forward is not a convolution of x."""
        if type(m) in _TORCH_CONVS:     # its output has its geometry: skip the key and lookup
            return x
        nd = len(m.kernel_size)
        if not isinstance(output, torch.Tensor) or output.dim() != x.dim():
            return x
        geometry = (type(m).__name__, m.kernel_size, m.stride, m.dilation, m.padding,
                    tuple(x.shape[-nd:]), tuple(output.shape[-nd:]))
        # memoised in eager mode (NOTE: [launch plans]); a traced forward derives it once per
        # graph, and through the cache dynamo would warn of "silent incorrectness" on every conv
        if torch.compiler.is_compiling():
            flat = _extra_padding.__wrapped__(*geometry)
        else:
            try:
                flat = _extra_padding(*geometry)
            except TypeError:       # a subclass's unhashable geometry (a list)
                flat = _extra_padding.__wrapped__(*geometry)
        if not flat:
            return x
        # not while tracing: the warning breaks the graph, and reading the set guards on it
        if not torch.compiler.is_compiling() and type(m) not in _WARNED_PADDING:
            _WARNED_PADDING.add(type(m))
            warn_user(f"AdaFisher: {type(m).__name__}'s output is larger than its padding "
                      f"{m.padding} gives, so its forward pads the input itself; the "
                      f"statistics assume zero padding, total // 2 before (TensorFlow's "
                      f"'SAME', as timm's Conv2dSame), NOTE: [padding inside forward]")
        return torch.nn.functional.pad(x, flat)


@register_layer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeKind(LayerKind):
    """paper only (the released code does not hook it).  NOTE: [transposed conv] A transposed
    conv is the adjoint of the conv of its geometry: its weight (C_in, C_out/g, *k) has gradient
    sum_{b,l} x[b, c, l] P[b, l, (o, *k)], with P the patches of the output gradient s that the
    conv (kernel, stride, padding, dilation) sees in c's group, over the lattice of input
    positions l.  So the sides swap: H[c] = mean_{b,l} x[b, c, l]^2 (+ bias entry 1) from
    linear_stats, and S[group, j] = mean_{b,l} P[b, l, j]^2 over j = (o, *k) of that group
    (D = C_out/g * prod(k) per group) from conv_stats of s.  Bias entries follow,
    S[g D + o] = mean over output positions of s[o]^2.  weight[c, j] uses H'[c] S'[group(c), j]:
    the per-group term a map has only on its H side indexes S here (``cross_matrix_map``);
    bias[o] uses S'[g D + o] H'[C_in]."""
    released = ()

    @staticmethod
    def _dims(m):
        g = m.groups
        return g, (m.out_channels // g) * math.prod(m.kernel_size), int(m.bias is not None)

    def factors(self, m, preset):
        g, d, b = self._dims(m)
        c_in, c_out = m.in_channels, m.out_channels
        h = FactorSpec(c_in, c_in + b, mean_terms(c_in) + ([const_term(c_in, 1.0)] if b else []))
        n_s = g * d + b * c_out
        return h, FactorSpec(n_s, n_s, mean_terms(n_s), 2)

    def param_maps(self, m, preset):
        g, d, b = self._dims(m)
        c_in = m.in_channels
        maps = {"weight": cross_matrix_map(c_in, d, c_in + b, groups=g)}
        if b:
            maps["bias"] = row_map(m.out_channels, s_off=g * d, h_off=c_in, h_r=0)
        return maps

    def h_stats(self, m, x, acc, preset, ops):
        if x.dim() == len(m.kernel_size) + 1:       # unbatched input
            x = x.unsqueeze(0)
        ops.linear_stats(x, acc, dim=1)
        return x.numel() // m.in_channels

    def s_stats(self, m, s, acc, preset, ops):
        nd = len(m.kernel_size)
        if s.dim() == nd + 1:
            s = s.unsqueeze(0)
        g, d, b = self._dims(m)
        # The lattice of the conv over s has one position per input position, whatever
        # output_padding < stride added at the end (never read).  output_padding >= stride (only
        # possible with dilation > stride) adds whole positions: its padding is cut off instead.
        sc, pad = s, []
        for i, (p, op, st) in enumerate(zip(m.padding, m.output_padding, m.stride)):
            cut = op if op >= st else 0
            if cut > p:
                sc = sc.narrow(2 + i, 0, sc.shape[2 + i] - (cut - p))
            pad.append((p, max(p - cut, 0)))
        positions = ops.conv_stats(sc, acc[:g * d], m.kernel_size, m.stride, pad, m.dilation, g)
        if b:                       # a mean over output positions, with the factor's count
            out_positions = math.prod(s.shape[2:])
            ops.linear_stats(s, acc[g * d:], dim=1, scale=positions / out_positions)
        return s.shape[0] * positions


class NormKind(LayerKind):
    """Shared by the normalisation layers under preset="paper" (Proposition 3.1):
    H = [mean_T xhat[c]^2 ; 1 per bias entry], S[c] = mean_T s[c]^2, weight[c] uses S'[c] H'[c]
    and bias[c] uses S'[c] H'[C + c].  Subclasses say how to view x and s as (rows, C, inner)."""

    def n_features(self, m) -> int:
        raise NotImplementedError

    def view(self, m, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def factors(self, m, preset):
        c, b = self.n_features(m), int(getattr(m, "bias", None) is not None)
        h = FactorSpec(c, c * (1 + b), mean_terms(c) + [const_term(c + j, 1.0) for j in range(c * b)])
        return h, FactorSpec(c, c, mean_terms(c), 2)

    def param_maps(self, m, preset):
        c = self.n_features(m)
        maps = {"weight": row_map(c)}
        if getattr(m, "bias", None) is not None:
            maps["bias"] = row_map(c, h_off=c)
        return maps

    def s_stats(self, m, s, acc, preset, ops):
        s3 = self.view(m, s)
        ops.linear_stats(s3, acc, dim=1)
        return s3.shape[0] * s3.shape[2]


@register_layer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormKind(NormKind):
    """paper: xhat with batch statistics in training mode, running statistics in eval mode.
    official (BatchNorm2d only): u[c] = sum_{b,y,x} x / (Hh W)^2, H = [sum_c u^2, C] / B^2,
    S[c] = (sum_{b,y,x} s)^2 / B; weight[c] uses H'[0], bias[c] uses H'[1].  Both are square-of-sum
    statistics, so the accumulators hold the plain sums and the squares are taken at step()."""
    released = (nn.BatchNorm2d,)

    def n_features(self, m):
        return m.num_features

    def view(self, m, t):
        return t.reshape(t.shape[0], m.num_features, math.prod(t.shape[2:]))   # 0 rows too

    def factors(self, m, preset):
        if not preset.only_released_layers:
            return super().factors(m, preset)
        c = m.num_features
        h = FactorSpec(c, 2, [(j, 0, 2, 1.0, 2) for j in range(c)] + [const_term(1, c, q=2)])
        return h, FactorSpec(c, c, [(j, j, 2, 1.0, 1) for j in range(c)], 1)

    def param_maps(self, m, preset):
        if not preset.only_released_layers:
            return super().param_maps(m, preset)
        c = m.num_features
        return {"weight": row_map(c, h_off=0, h_r=0), "bias": row_map(c, h_off=1, h_r=0)}

    def h_stats(self, m, x, acc, preset, ops):
        # the column sums over dim 1 read x as it is: no (B, C, positions) view (2 us of host
        # time a call, NOTE: [launch plans] in fisher_kernels/host.py)
        if preset.only_released_layers:
            ops.linear_stats(x, acc, dim=1, square=False, scale=1.0 / math.prod(x.shape[2:]) ** 2)
            return x.shape[0]
        x3 = self.view(m, x)
        ops.norm_stats(x3, acc, "channel", 1, m.eps, True, *self.moments(m, x3))
        return x3.shape[0] * x3.shape[2]

    def moments(self, m, x3: torch.Tensor):
        """(mean, var) per channel that the layer normalised x3 (R, C, I) with, or (None, None)
        for x3's own batch statistics: the running ones in eval mode, whenever the buffers exist,
        as torch's _BatchNorm.forward decides (also with track_running_stats set to False after
        construction, the buffers kept)."""
        if not m.training and m.running_mean is not None and m.running_var is not None:
            return m.running_mean, m.running_var
        return None, None

    def s_stats(self, m, s, acc, preset, ops):
        if not preset.only_released_layers:
            return super().s_stats(m, s, acc, preset, ops)
        ops.linear_stats(s, acc, dim=1, square=False)       # (no view, as h_stats)
        return s.shape[0]


def _synced(m: nn.SyncBatchNorm) -> bool:
    """Whether this call normalised with the statistics of every rank's batch (the test
    SyncBatchNorm.forward makes)."""
    if not (m.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(m.process_group or torch.distributed.group.WORLD) > 1


def _global_moments(x3: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x3 (R, C, I) over every rank's batch: two
    all-reduces (sums, then centred squares), traceable by torch.compile."""
    from torch.distributed import _functional_collectives as funcol
    group = group or torch.distributed.group.WORLD
    xs = x3.to(torch.float64 if x3.dtype == torch.float64 else torch.float32)
    count = xs.new_full((1,), float(x3.shape[0] * x3.shape[2]))
    tot = funcol.all_reduce(torch.cat([xs.sum((0, 2)), count]), "sum", group)
    mean = tot[:-1] / tot[-1]
    m2 = funcol.all_reduce((xs - mean[:, None]).square().sum((0, 2)), "sum", group)
    return mean, m2 / tot[-1]


@register_layer(nn.SyncBatchNorm)
class SyncBatchNormKind(BatchNormKind):
    """paper only (the released code hooks nn.BatchNorm2d, which SyncBatchNorm is not): BatchNorm's
    statistics.  NOTE: [SyncBatchNorm] In multi-process training the layer normalises with the
    mean and variance of the global batch, so xhat is recomputed with those (two small
    all-reduces per layer and statistics iteration); H then averages over ranks as every
    statistic does (SPEC section 6).  In one process it is BatchNorm."""
    released = ()

    def moments(self, m, x3):
        return _global_moments(x3, m.process_group) if _synced(m) else super().moments(m, x3)


def dtensor_types() -> tuple:
    """(DTensor,), or () before torch.distributed.tensor is imported, when no tensor can be one:
    ``isinstance(t, dtensor_types())`` without importing that module, which takes 0.4 s (it
    loads sympy; NOTE: [lazy imports])."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return () if cls is None else (cls,)


def call_result(output):
    """A layer call's result, whose gradient S reads and which the probes compare: its output,
    or the first of a plain tuple or list it returns (a norm that also returns its residual)."""
    return output[0] if type(output) in (tuple, list) and output else output


def probe_call(m: nn.Module, x: torch.Tensor):
    """``type(m).forward(m, x)`` eagerly, without hooks or grad (``LayerKind.probe``); None when
    it raises (any failure means only that the probe cannot tell) or when a parameter of m is
    sharded (FSDP2's DTensors: a forward outside FSDP's hooks cannot use them)."""
    if any(isinstance(p, dtensor_types()) for p in m.parameters(recurse=False)):
        return None
    try:
        with torch.no_grad():
            return type(m).forward(m, x)
    except Exception:       # noqa: BLE001
        return None


_LAYOUT = "_adafisher_layout"


def _probe_layout(m: nn.Module) -> None:
    """Records on a LayerNorm subclass instance with a forward of its own the dim it normalises:
    -1 (the trailing dims) or 1; nothing when the probe could not tell (NOTE: [channels-first
    LayerNorm]).  Per instance, not per class: Hugging Face's ConvNextLayerNorm is one class
    whose instances normalise either, by their ``data_format``."""
    if type(m).forward is nn.LayerNorm.forward or not isinstance(m, nn.LayerNorm):   # RMSNorms
        return
    if _LAYOUT not in m.__dict__:
        dim = _try_layout(m)
        if dim is not None:
            m.__dict__[_LAYOUT] = dim


def probe_on_cpu(m: nn.Module, x: torch.Tensor, params: Dict[str, torch.Tensor]):
    """``type(m).forward(m, x)`` eagerly, without hooks or grad, with ``params`` (CPU tensors) in
    place of m's own parameters of those names, wherever those are (on the meta device, sharded
    by FSDP2, on a GPU); None when it raises (the probe then cannot tell)."""
    try:
        with torch.no_grad(), reparametrize(m, params):
            return type(m).forward(m, x)
    except Exception:       # noqa: BLE001
        return None


def _own_result(m: nn.Module, x: torch.Tensor, params: Dict[str, torch.Tensor]):
    """``probe_on_cpu``'s result where the layer's own operation ends, where the hooks take S:
    the input of the first submodule its forward calls, unless that is x itself (timm's
    LayerNormAct2d normalises, then calls its drop and act submodules, NOTE: [composite
    layers]); else its ``call_result``."""
    first = []
    handles = [c.register_forward_pre_hook(lambda mod, args: first.append(args[:1]))
               for c in m.children()]
    try:
        out = probe_on_cpu(m, x, params)
    finally:
        for h in handles:
            h.remove()
    arg = first[0][0] if first and first[0] else None
    if isinstance(arg, torch.Tensor) and arg is not x and out is not None:
        return arg
    return call_result(out)


def _try_layout(m: nn.LayerNorm) -> Optional[int]:
    """The dim that ``type(m).forward`` normalises, tried on a (2, a, C) and a (2, C, a, a)
    probe input (a != C) with float32 probe parameters (whatever the default dtype); None when
    neither fits."""
    if len(m.normalized_shape) != 1:
        return None
    c = m.normalized_shape[0]
    a = 2 if c != 2 else 3
    g = torch.Generator().manual_seed(0)
    params = {n: torch.rand(p.shape, generator=g, dtype=torch.float32) + 0.5
              for n, p in m.named_parameters(recurse=False)}
    for dim, shape in ((-1, (2, a, c)), (1, (2, c, a, a))):
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        out = _own_result(m, x, params)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            continue
        want = torch.nn.functional.layer_norm(x.movedim(dim, -1), (c,), params.get("weight"),
                                              params.get("bias"), m.eps)
        if torch.allclose(out.float(), want.movedim(-1, dim), rtol=1e-3, atol=1e-3):
            return dim
    return None


@register_layer(nn.LayerNorm)
class LayerNormKind(NormKind):
    """paper: per-row statistics over normalized_shape (N elements), H_w/S indexed by those.
    official: u = sum_{dims != 1} x / M^2 (M = product of the reduced dims but dim 0),
    H = [sum u^2, size(dim 1)] / B^2, S[d] = (sum_{all dims but last} s[..., d])^2 / B over the last
    dim; weight/bias use H'[0]/H'[1].  NOTE: u is indexed by dim 1, whose size (a sequence length
    for 3-D inputs) is unknown until the first call, so under "official" sum u^2 is taken per call
    and accumulated; one call per step (the released code's setting) is exact."""
    released = (nn.LayerNorm,)

    def n_features(self, m):
        return math.prod(m.normalized_shape)

    def view(self, m, t):
        n = self.n_features(m)
        return t.reshape(-1, n, 1)

    def probe(self, m):
        _probe_layout(m)            # NOTE: [channels-first LayerNorm]
        return True

    def h_input(self, m, x, output):
        return self._normalized_last(m, x)

    def s_input(self, m, s):
        return self._normalized_last(m, s)

    @staticmethod
    def _normalized_last(m, t):
        """NOTE: [channels-first LayerNorm] A subclass may normalise dim 1 of an NC* tensor by
        permuting around F.layer_norm in its forward (timm's LayerNorm2d, ConvNeXt's norm layers):
        its input and output gradient are (B, C, *spatial) with normalized_shape (C,).  Such a
        tensor is read with dim 1 moved last (a copy unless it is channels_last), the layout the
        layer normalises.  Which dim a subclass's instance normalises is found at construction by
        calling its forward on probe inputs (``_probe_layout``): a (B, C, H, W) input with W = C
        fits both readings.  For a class the probe could not call, trailing dims equal to
        normalized_shape are read as they are, first."""
        shape = tuple(m.normalized_shape)

        def first():        # only asked where it decides: compiled, each question is a guard
            return len(shape) == 1 and t.dim() >= 3 and t.shape[1] == shape[0]
        # (not getattr(m, _LAYOUT, None): Module.__getattr__ raises for a name it lacks, 2.5 us)
        layout = m.__dict__.get(_LAYOUT)
        if layout == 1 and first():
            return t.movedim(1, -1)
        if tuple(t.shape[t.dim() - len(shape):]) == shape:
            return t
        if first():
            return t.movedim(1, -1)
        raise ValueError(f"AdaFisher: {type(m).__name__}(normalized_shape={shape}) got a tensor of "
                         f"shape {tuple(t.shape)}: neither its trailing dims nor dim 1 are "
                         f"normalized_shape; register a LayerKind for it "
                         f"(adafisher_fast.register_layer)")

    def factors(self, m, preset):
        if not preset.only_released_layers:
            return super().factors(m, preset)
        d = m.normalized_shape[-1]
        h = FactorSpec(2, 2, [(0, 0, 1, 1.0, 2), (1, 1, 1, 1.0, 3)])
        return h, FactorSpec(d, d, [(j, j, 2, 1.0, 1) for j in range(d)], 1)

    def param_maps(self, m, preset):
        if not preset.only_released_layers:
            return super().param_maps(m, preset)
        d = m.normalized_shape[-1]
        rows = self.n_features(m) // d
        maps = {"weight": (rows, d, 0, 0, 1, 0, 0, 0, rows, 0)}
        if m.bias is not None:
            maps["bias"] = (rows, d, 0, 0, 1, 1, 0, 0, rows, 0)
        return maps

    def h_stats(self, m, x, acc, preset, ops):
        if not preset.only_released_layers:
            x3 = self.view(m, x)
            ops.norm_stats(x3, acc, "sample", 1, m.eps, True)
            return x3.shape[0]
        if x.dim() == 1:                          # unbatched: a batch of one
            x = x.unsqueeze(0)
        b, t = x.shape[0], x.shape[1]
        reduced = math.prod(x.shape[2:])          # M: reduced dims other than dim 0
        # u * M^2 by torch's reduction, which writes its output: our column sums add into
        # theirs, so u took a zero fill too (a launch more on every LayerNorm call); sum u^2 by
        # the op (acc[0] += u.square().sum() was four launches: an indexed augmented assignment
        # copies back)
        u = x.sum([0, *range(2, x.dim())], dtype=acc.dtype)
        ops.linear_stats(u.view(t, 1), acc[:1], dim=1, scale=1.0 / reduced ** 4)
        acc[1:].add_(t * b)
        return b

    def s_stats(self, m, s, acc, preset, ops):
        if not preset.only_released_layers:
            return super().s_stats(m, s, acc, preset, ops)
        ops.linear_stats(s, acc, dim=-1, square=False)
        return s.shape[0] if s.dim() > 1 else 1


@register_layer(nn.GroupNorm)
class GroupNormKind(NormKind):
    """paper only: per (sample, group) statistics over (C/G channels, spatial)."""

    def n_features(self, m):
        return m.num_channels

    def view(self, m, t):
        return t.reshape(t.shape[0], m.num_channels, math.prod(t.shape[2:]))   # 0 rows too

    def h_stats(self, m, x, acc, preset, ops):
        x3 = self.view(m, x)
        ops.norm_stats(x3, acc, "sample", m.num_groups, m.eps, True)
        return x3.shape[0] * x3.shape[2]


if hasattr(nn, "RMSNorm"):
    @register_layer(nn.RMSNorm, "timm.layers.norm.RmsNorm", "timm.layers.norm.RmsNormFp32")
    class RMSNormKind(LayerNormKind):
        """paper only: xhat = x / sqrt(mean(x^2) + eps) per row.  eps=None is the epsilon of the
        type torch normalises in (float32 for float16/bfloat16 inputs, as F.rms_norm does).
        timm's RmsNorm and RmsNormFp32 compute this with nn.RMSNorm's attributes (normalized_shape,
        eps, weight or None), matched by name so that timm stays optional."""
        released = ()

        def h_stats(self, m, x, acc, preset, ops):
            x3 = self.view(m, x)
            eps = m.eps
            if eps is None:
                eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
            ops.norm_stats(x3, acc, "sample", 1, eps, False)
            return x3.shape[0]

    @register_layer("timm.layers.norm.RmsNorm2d", "timm.layers.norm.RmsNorm2dFp32")
    class RmsNorm2dKind(RMSNormKind):
        """paper only: timm's RmsNorm2d (MobileNetV5, Gemma 3n's vision tower, ConvNeXt's
        rmsnorm variants) normalises dim 1 of (B, C, *spatial) as nn.RMSNorm would the last dim
        of that tensor with dim 1 moved last, which is how it is read (a copy unless it is
        channels_last).  Its subclasses (RmsNormAct2d: then an activation) match too."""

        def h_input(self, m, x, output):
            return x.movedim(1, -1)

        def s_input(self, m, s):
            return s.movedim(1, -1)


# Hugging Face's RMSNorm classes (module, class): weight * x / sqrt(mean(x^2) + eps) over the last
# dim, eps in variance_epsilon or eps; Gemma's and Qwen3-Next's scale by 1 + weight, which has the
# same gradient.  Each was checked against transformers 5.24.0 and 5.25.0 by running it on random
# input.  The other classes of transformers.models named *RMSNorm are probed
# (HFRMSNormKind.probe): 189 of 5.25.0's 203 such classes compute one of these two forms (eleven
# have no weight, one scales its input before normalising, one is gated, one is conditioned).
_HF_RMSNORMS = (
    ("llama", "LlamaRMSNorm"), ("llama4", "Llama4TextRMSNorm"), ("mllama", "MllamaTextRMSNorm"),
    ("mistral", "MistralRMSNorm"), ("mistral3", "Mistral3RMSNorm"),
    ("ministral", "MinistralRMSNorm"), ("mixtral", "MixtralRMSNorm"),
    ("qwen2", "Qwen2RMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"), ("qwen2_vl", "Qwen2VLRMSNorm"),
    ("qwen2_5_vl", "Qwen2_5_VLRMSNorm"), ("qwen3", "Qwen3RMSNorm"), ("qwen3_moe", "Qwen3MoeRMSNorm"),
    ("qwen3_vl", "Qwen3VLTextRMSNorm"), ("qwen3_next", "Qwen3NextRMSNorm"),
    ("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm"),
    ("gemma3n", "Gemma3nRMSNorm"), ("deepseek_v2", "DeepseekV2RMSNorm"),
    ("deepseek_v3", "DeepseekV3RMSNorm"), ("phi3", "Phi3RMSNorm"), ("olmo2", "Olmo2RMSNorm"),
    ("olmo3", "Olmo3RMSNorm"), ("olmoe", "OlmoeRMSNorm"), ("granite", "GraniteRMSNorm"),
    ("granitemoe", "GraniteMoeRMSNorm"), ("smollm3", "SmolLM3RMSNorm"), ("gpt_oss", "GptOssRMSNorm"),
    ("glm", "GlmRMSNorm"), ("glm4", "Glm4RMSNorm"), ("helium", "HeliumRMSNorm"),
    ("mamba", "MambaRMSNorm"), ("mamba2", "Mamba2RMSNorm"), ("jamba", "JambaRMSNorm"),
    # T5's form, named *LayerNorm
    ("t5", "T5LayerNorm"), ("mt5", "MT5LayerNorm"), ("umt5", "UMT5LayerNorm"),
    ("longt5", "LongT5LayerNorm"), ("switch_transformers", "SwitchTransformersLayerNorm"),
    ("pop2piano", "Pop2PianoLayerNorm"), ("udop", "UdopLayerNorm"),
    ("pix2struct", "Pix2StructLayerNorm"), ("kosmos2_5", "Kosmos2_5LayerNorm"),
    ("cpmant", "CpmAntLayerNorm"))
_HF_LISTED = tuple(f"transformers.models.{mod}.modeling_{mod}.{cls}" for mod, cls in _HF_RMSNORMS)
_RMS_FORM = "_adafisher_rms_form"


def _rms_eps(m: nn.Module) -> Optional[float]:
    eps = getattr(m, "variance_epsilon", None)
    return getattr(m, "eps", None) if eps is None else eps


@register_layer(*_HF_LISTED, "transformers.models.*RMSNorm")
class HFRMSNormKind(NormKind):
    """paper only, as nn.RMSNorm: Hugging Face's RMSNorm classes (LLaMA, Mistral, Qwen, Gemma,
    DeepSeek, Phi-3, OLMo, Granite, SmolLM3, gpt-oss, GLM, T5, ...), matched by name, so
    transformers stays optional.  H_w[c] = mean_T xhat[c]^2 with
    xhat = x / sqrt(mean(x^2) + eps) over the last dim, S[c] = mean_T s[c]^2."""

    def n_features(self, m):
        return m.weight.numel()

    def view(self, m, t):
        return t.reshape(-1, self.n_features(m), 1)

    def param_maps(self, m, preset):        # Gemma3n's with_scale=False has no weight
        has_weight = isinstance(getattr(m, "weight", None), nn.Parameter)
        return super().param_maps(m, preset) if has_weight else {}

    def probe(self, m):
        """The classes listed in _HF_RMSNORMS (and their subclasses that keep their forward:
        FSDP2's FSDP<Name>) are read as they are.  Another class the name pattern matches is
        read only if its forward, called on a probe input with a probe weight (once per module),
        computes weight * xhat or (1 + weight) * xhat with the eps it holds; otherwise it is left
        factor-free and the construction warning names it."""
        # the class whose forward runs: FSDP2's FSDP<Name> defines none, a user's subclass may
        own = next(c for c in type(m).__mro__ if "forward" in vars(c))
        if f"{own.__module__}.{own.__qualname__}" in _HF_LISTED:
            return True
        if _RMS_FORM not in m.__dict__:
            form = _rms_form(m)
            if form is None:            # it could not be called: not remembered
                return False
            m.__dict__[_RMS_FORM] = form
        return m.__dict__[_RMS_FORM]

    def h_stats(self, m, x, acc, preset, ops):
        x3 = self.view(m, x)
        ops.norm_stats(x3, acc, "sample", 1, _rms_eps(m), False)
        return x3.shape[0]


def _rms_form(m: nn.Module) -> Optional[bool]:
    """Whether ``type(m).forward`` computes w * xhat or (1 + w) * xhat over the last dim, called
    eagerly without hooks on a CPU probe input with a CPU probe weight in place of its own (its
    weight at initialisation, ones or zeros, would not tell these from scaling the input before
    normalising it; and its own may be on meta or sharded); None when it cannot be called."""
    w, eps = getattr(m, "weight", None), _rms_eps(m)
    if not isinstance(w, nn.Parameter) or not isinstance(eps, float):
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, w.numel(), generator=g, dtype=torch.float32)     # whatever the default
    probe = torch.rand(w.shape, generator=g, dtype=torch.float32) + 0.5
    out = probe_on_cpu(m, x, {"weight": probe})
    if out is None:
        return None
    out = call_result(out)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return False
    xhat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return any(torch.allclose(out.float(), xhat * scale, rtol=1e-3, atol=1e-3)
               for scale in (probe, 1 + probe))


@register_layer(nn.Embedding)
class EmbeddingKind(LayerKind):
    """paper only: H[v] = token frequency, S[d] = mean over tokens of s[d]^2;
    weight[v, d] uses H'[v] S'[d] (H by row, S by column)."""

    def factors(self, m, preset):
        v, d = m.num_embeddings, m.embedding_dim
        return FactorSpec(v, v, mean_terms(v)), FactorSpec(d, d, mean_terms(d), 2)

    def param_maps(self, m, preset):
        v, d = m.num_embeddings, m.embedding_dim
        return {"weight": matrix_map(v, d, transposed=True)}

    def h_stats(self, m, x, acc, preset, ops):
        ops.embedding_stats(x, acc)
        return x.numel()

    def s_stats(self, m, s, acc, preset, ops):
        ops.linear_stats(s, acc)
        return s.numel() // m.embedding_dim

    def probe(self, m):
        return _probe_lookup(m) is not False

    def h_input(self, m, x, output):
        """NOTE: [embedding lookups] H counts the indices a call looks up, so x must be them.  A
        subclass with a forward of its own may look up something else: Hugging Face's learned
        positional embeddings (BART, mBART, OPT, Whisper) take the token ids, the attention mask
        or the input embeddings only for their shape and look up positions.  So such a class is
        checked once: x must be in-range integer indices whose lookup the output is (up to one
        scale, as a scaled word embedding).  The check runs at construction on probe indices
        (``_probe_lookup``); a class that fails it gets no hooks, and the construction warning
        names it.  When the probe cannot call the forward (it needs other arguments), the first
        eager statistics call is checked instead, and a class that fails gathers nothing, with
        one warning; compiled calls before that gather nothing, since values cannot be read
        while tracing (a warning at construction says so).  A call on input that is not
        integer indices (Ovis2's visual embedding table multiplies soft tokens by its weight) gathers
        nothing either, with one warning per class, whatever the probe found."""
        if type(m).forward is nn.Embedding.forward:
            return x
        if x.dtype not in (torch.int32, torch.int64):
            if not torch.compiler.is_compiling() and type(m) not in _NOT_INDICES:
                _NOT_INDICES.add(type(m))
                warn_user(f"AdaFisher: {type(m).__name__} was called on {x.dtype} input, "
                          f"not indices, so such calls gather no statistics (NOTE: "
                          f"[embedding lookups])")
            return None
        ok = _PROBED.get(type(m))
        if ok is None:
            ok = _CHECKED.get(type(m))
        if ok is None and not torch.compiler.is_compiling() and x.numel():   # empty: cannot tell
            ok = _CHECKED[type(m)] = _looks_up(m, x, output)
            if not ok:
                warn_user(f"AdaFisher: {type(m).__name__}'s forward does not look up the "
                          f"indices it is given (a positional embedding?), so it gathers no "
                          f"statistics and its weight steps with its current factors; "
                          f"register a LayerKind for it (NOTE: [embedding lookups])")
        return x if ok else None


# Embedding subclasses with a forward of their own: whether it looks up its input, by the probe at
# construction (None: it could not tell) and by the first eager call of a class the probe could
# not tell.  Only the probe decides which modules are layers, so that the layers of a model, and
# its checkpoints, do not depend on what ran before in the process (NOTE: [embedding lookups])
_PROBED: Dict[type, Optional[bool]] = {}
_CHECKED: Dict[type, bool] = {}
_NOT_INDICES: set = set()           # classes warned about a call on input that is not indices


def _probe_lookup(m: nn.Embedding) -> Optional[bool]:
    """Whether ``type(m).forward`` looks up the indices it is given, probed once per class (and
    a warning when the probe cannot tell)."""
    cls = type(m)
    if cls.forward is nn.Embedding.forward:
        return True
    if cls not in _PROBED:
        _PROBED[cls] = _try_lookup(m)
        if _PROBED[cls] is None and m.weight.requires_grad:    # a frozen table is not a layer
            warn_user(f"AdaFisher: {cls.__name__}'s forward could not be tried on probe "
                      f"indices, so whether it looks up the indices it is given is checked "
                      f"at its first eager statistics call; until then compiled calls "
                      f"gather nothing, and so does any call given no tensor of indices "
                      f"(a shape, as some positional embeddings take) (NOTE: [embedding "
                      f"lookups])")
    return _PROBED[cls]


def _try_lookup(m: nn.Embedding) -> Optional[bool]:
    """``_looks_up`` of the class's forward called on two rows of probe indices (eagerly, without
    hooks or grad); None when the probe cannot tell: a forward that needs other arguments, a
    weight without values or with equal probed rows, or max_norm (a lookup would renormalise
    the rows in place)."""
    v, w = m.num_embeddings, m.weight
    if (v < 2 or w.is_meta or isinstance(w, dtensor_types()) or m.max_norm is not None
            or tuple(w.shape) != (v, m.embedding_dim)):
        return None             # DTensor: FSDP2's shard (probe_call)
    row = (torch.arange(min(v, 5), device=w.device) + 1) % v      # not positions 0, 1, ...
    if torch.unique(w.detach()[row].double(), dim=0).shape[0] < row.numel():
        return None
    ids = torch.stack([row, row.flip(0)])
    out = probe_call(m, ids)
    return None if out is None else _looks_up(m, ids, out)


def _looks_up(m: nn.Embedding, x: torch.Tensor, output) -> bool:
    """Whether ``output`` is c * weight[x] for in-range integer indices x and one scalar c, to
    the rounding of the output's dtype (a bfloat16 output rounds c * weight to 2^-8)."""
    if (x.dtype not in (torch.int32, torch.int64) or not isinstance(output, torch.Tensor)
            or tuple(output.shape) != (*x.shape, m.embedding_dim)):
        return False
    if x.numel() == 0 or int(x.min()) < 0 or int(x.max()) >= m.num_embeddings:
        return False
    ref = torch.nn.functional.embedding(x, m.weight.detach()).to(torch.float64)
    out = output.detach().to(torch.float64)
    scale = (out * ref).sum() / (ref * ref).sum().clamp_min(1e-300)
    rtol = max(1e-3, torch.finfo(output.dtype).eps) if output.is_floating_point() else 1e-3
    return bool(torch.allclose(out, scale * ref, rtol=rtol, atol=1e-6 * float(ref.abs().max())))
