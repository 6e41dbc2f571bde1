"""The optimizer's curvature state, laid out flat for one-launch kernels (SPEC sections 3-4).

* ``buf``   raw-statistics accumulators of every hooked layer, then one row count per factor;
            the hooks add into it (the counts by way of the host, NOTE: [host row counts]),
            ``zero_grad()`` and ``step()`` clear it.
* ``state`` EMA of the raw H and S of every layer; ``fac`` the H'/S' that the update reads, plus a
            constant 1 in its last slot for factor-free parameters.
* ``meta``  per parameter, the (row, column) -> (S', H') index map (NOTE: [param map]).

Everything is derived from the registry in ``layers.py``; nothing here knows a layer type.
"""
from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import kernel_host
from .layers import (FactorSpec, LayerKind, kind_of, submodules, warn_unmatched_names,
                     warn_user)
from .reference import LayerTable, map_indices


@dataclass
class Layer:
    """One hooked module and where its statistics live."""
    name: str
    module: nn.Module
    kind: LayerKind
    h_acc: slice        # accumulator ranges in buf
    s_acc: slice
    h_factor: int       # factor indices: the row counts are buf[n_acc + factor]
    s_factor: int
    h_raw: slice        # ranges in state / fac
    s_raw: slice
    # modules of the same type whose parameters are this module's (NOTE: [shared parameters])
    aliases: List[nn.Module] = field(default_factory=list)
    # an eager call its kind could not read (not a tensor, or h_input gave None) was seen
    unread: bool = False
    # an eager call with no rows (an empty batch) was seen: rows of 0 do not make it silent
    empty: bool = False
    # the names of the parameters the layer trains (NOTE: [gradient passes] in hooks.py)
    pnames: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The name the user-facing reports key the layer by: "<root>" for the model itself."""
        return self.name or "<root>"

    @property
    def modules(self) -> List[nn.Module]:
        """The modules whose calls gather this layer's statistics: its own, then the aliases."""
        return [self.module] + self.aliases

    def module_at(self, which: int) -> nn.Module:
        """``modules[which]`` without making the list (the hooks ask on every call)."""
        return self.module if which == 0 else self.aliases[which - 1]


def _check_map(row: tuple, p: torch.Tensor, lay: Layer, pname: str) -> None:
    """Raise ValueError unless the global map ``row`` of ``p`` (NOTE: [param map] in reference.py)
    covers p's elements and indexes only its layer's H and S: a layer kind's wrong map would
    otherwise read other layers' factors, or past the buffer in a kernel."""
    rows, cols, _, s_r, s_c, _, h_r, h_c, h_gr, h_gs, _ = row
    what = f"AdaFisher: {type(lay.kind).__name__}.param_maps of '{lay.name}' maps '{pname}'"
    if rows * cols != p.numel() or cols < 1 or h_gr < 1:
        raise ValueError(f"{what} as ({rows} x {cols}) with h_gr={h_gr}: expected rows * cols = "
                         f"{p.numel()} (its shape {tuple(p.shape)}), cols >= 1 and h_gr >= 1")
    negative = [f"{n}={v}" for n, v in zip(("s_r", "s_c", "h_r", "h_c", "h_gs"),
                                           (s_r, s_c, h_r, h_c, h_gs)) if v < 0]
    if negative:        # the ops bound a row's indices by its last element's (reference.check_meta)
        raise ValueError(f"{what} with {', '.join(negative)}: expected strides >= 0")
    if rows == 0:
        return
    # indices are affine in c, so the first and last column bound them
    reach = map_indices(row, torch.arange(rows)[:, None], torch.tensor([0, cols - 1]))
    lo, hi = min(int(t.min()) for t in reach), max(int(t.max()) for t in reach)
    if lo < lay.h_raw.start or hi >= lay.s_raw.stop:
        n_h, n_s = lay.h_raw.stop - lay.h_raw.start, lay.s_raw.stop - lay.s_raw.start
        raise ValueError(f"{what} to factor entries {lo - lay.h_raw.start}..{hi - lay.h_raw.start} "
                         f"of its layer's H and S, which hold {n_h} + {n_s} entries, H first")


def _check_spec(sp: FactorSpec, side: str, kind: LayerKind, name: str, m: nn.Module) -> None:
    """Raise ValueError unless every term of a layer kind's FactorSpec reads one of the factor's
    own ``acc_size`` accumulators (pow 0 reads none) and writes one of its ``size`` raw entries:
    a term outside them reads or writes another layer's statistics, or past the buffer in a
    kernel."""
    what = f"AdaFisher: {type(kind).__name__}.factors of '{name or '<root>'}' ({type(m).__name__})"
    if sp.acc_size < 0 or sp.size < 0:
        raise ValueError(f"{what}: {side} has acc_size={sp.acc_size}, size={sp.size}")
    for t in sp.terms:
        src, dst, pw, _, q = t
        if pw not in (0, 1, 2) or q not in (0, 1, 2, 3):
            # the powers Triton's layer_ema computes (it squared for any pow >= 2, cubed the
            # count for any q >= 3), so that all backends agree
            raise ValueError(f"{what}: {side} term {t} has pow={pw}, q={q}; terms take pow 0, 1 "
                             f"or 2 and q 0, 1, 2 or 3")
        if not 0 <= dst < sp.size or (pw != 0 and not 0 <= src < sp.acc_size):
            raise ValueError(f"{what}: {side} term {t} reads accumulator {src} / writes raw entry "
                             f"{dst}, but {side} has {sp.acc_size} accumulators and {sp.size} raw "
                             f"entries")


def _model_class(m: nn.Module) -> type:
    """The module's class as the model defines it: FSDP2's fully_shard swaps in a subclass
    FSDP<Name>, which named the layers of a sharded model's checkpoints otherwise than an
    unsharded one's, so that neither loaded into the other (NOTE: [checkpoint layout])."""
    fsdp = sys.modules.get("torch.distributed.fsdp")        # not imported: nothing is sharded
    wrapper = getattr(fsdp, "FSDPModule", None)
    if wrapper is None or not isinstance(m, wrapper):
        return type(m)
    return next(c for c in type(m).__mro__ if not issubclass(c, wrapper))


def _mapped_param(m: nn.Module, pname: str) -> Optional[nn.Parameter]:
    """The parameter that a layer kind's map for ``m.<pname>`` applies to: that attribute when it
    is a parameter, else None.  NOTE: [pruned parameters] torch.nn.utils.prune turns a parameter
    ``weight`` into ``weight_orig``, from which a forward pre-hook computes ``weight =
    weight_orig * weight_mask``; torch.ao.pruning's sparsifiers parametrize it (FakeSparsity:
    ``weight = mask * parametrizations.weight.original``).  Either way the parameter's gradient
    is weight's, zero where masked, and weight's factors precondition it entry for entry.  A
    model pruned before the optimizer is made gets them as one pruned after does (the same
    parameter object, renamed).  Other reparametrisations compute the weight from parameters of
    other shapes or meanings and stay factor-free (``_factor_free_reason``)."""
    p = getattr(m, pname, None)
    if isinstance(p, nn.Parameter):
        return p
    if any(isinstance(h, prune.BasePruningMethod) and h._tensor_name == pname
           for h in m._forward_pre_hooks.values()):
        orig = m._parameters.get(pname + "_orig")
        if isinstance(orig, nn.Parameter):
            return orig
    # (torch.ao.pruning is imported by whoever sparsifies, not here)
    sparsity = getattr(sys.modules.get("torch.ao.pruning.sparsifier.utils"), "FakeSparsity", None)
    if sparsity is not None and parametrize.is_parametrized(m, pname):
        plist = m.parametrizations[pname]
        orig = getattr(plist, "original", None)
        if all(type(q) is sparsity for q in plist) and isinstance(orig, nn.Parameter):
            return orig
    return None


# torch.nn.utils.weight_norm / spectral_norm before parametrizations: a forward pre-hook
# computes the weight from weight_g/weight_v (weight_orig), the module keeps its kind
_OLD_PARAMETRIZATIONS = (WeightNorm, SpectralNorm)


def _factor_free_reason(m: nn.Module, preset) -> str:
    """Why ``m``'s own trainable parameters have no factors: "released" (its kind is one the
    preset does not hook), "unreadable" (its kind cannot read its calls), "attention" (an
    nn.MultiheadAttention, which expose_attention would expose), "parametrized" (they compute a
    weight through a torch parametrization), "unmapped" (its kind's param_maps leaves them out,
    as a custom kind may leave a scale factor-free), "scripted" (a TorchScript module: its
    forward calls no Python hooks) or "no kind"."""
    if isinstance(m, torch.jit.ScriptModule):
        return "scripted"
    kind = kind_of(m)
    if kind is not None and not kind.supported(m, preset):
        return "released"
    if kind is not None and not kind.probe(m):
        return "unreadable"
    if type(m) is nn.MultiheadAttention:
        return "attention"
    if isinstance(m, parametrize.ParametrizationList) or any(
            isinstance(h, _OLD_PARAMETRIZATIONS) for h in m._forward_pre_hooks.values()):
        return "parametrized"
    return "no kind" if kind is None else "unmapped"


def _warn_factor_free(owners: Dict[str, str], preset, known) -> None:
    """NOTE: [factor-free parameters] Trainable parameters that no hooked layer owns step without
    curvature: F = 1 (official) or 1 + Lambda (paper), steps up to 1/Lambda times smaller than a
    preconditioned layer's.  One warning at construction names their modules (``owners``: name
    -> ``_factor_free_reason``; those in ``known`` already named) and says what would
    precondition them: preset="paper" for the layer kinds the released code does not hook, a
    layer kind for other module types and parameters.  A weight computed by a parametrization
    (weight_norm, spectral_norm) is not a parameter, and the Fisher of the parameters it is
    computed from is not the weight's, so those stay factor-free and the warning says so."""
    new = {n: why for n, why in owners.items() if n not in known}
    if not new:
        return
    step = "plain momentum steps (F = 1)" if not preset.free_params_get_lambda else \
        "steps with F = 1 + Lambda"
    msg = (f"AdaFisher(preset='{preset.name}'): no curvature factors for the parameters of "
           f"{', '.join(new)}: they take {step}.")
    named = {why: [n for n, w in new.items() if w == why]
             for why in ("released", "unreadable", "unmapped", "attention", "parametrized",
                         "scripted")}
    if named["released"]:
        msg += (f" The released code does not hook {', '.join(named['released'])}; "
                f"preset='paper' preconditions them.")
    if named["unreadable"]:
        msg += (f" The calls of {', '.join(named['unreadable'])} cannot be read by their layer "
                f"kind: its probe found that their forward computes something else (an "
                f"nn.Embedding subclass that looks up positions, not its input, NOTE: [embedding "
                f"lookups]; an RMSNorm that scales its input before normalising it), or could "
                f"not call it; a layer kind of their own would precondition them.")
    if named["unmapped"]:
        msg += (f" The layer kinds of {', '.join(named['unmapped'])} map no factors to them "
                f"(their param_maps leaves them out).")
    if named["attention"]:
        msg += (f" adafisher_fast.expose_attention(model), before making the optimizer, "
                f"preconditions {', '.join(named['attention'])} (NOTE: [exposed attention]).")
    if named["parametrized"]:
        msg += (f" {', '.join(named['parametrized'])} compute a weight through a torch "
                f"parametrization (weight_norm, spectral_norm, ...): its curvature factors are "
                f"not theirs.")
    if named["scripted"]:
        msg += (f" TorchScript modules (torch.jit.script or trace) call no Python hooks: keep "
                f"{', '.join(named['scripted'])} eager to precondition them (torch.compile "
                f"compiles with the hooks).")
    if sum(map(len, named.values())) < len(new):
        msg += (" Other module types (and bare nn.Parameters) need a layer kind "
                "(adafisher_fast.register_layer) to be preconditioned.")
    warn_user(msg)


def _warn_composite(layers: List[Layer], known: Set[str]) -> Set[str]:
    """NOTE: [composite layers] A hooked module with submodules of its own (timm's BatchNormAct2d:
    batch_norm, then drop and act submodules; detectron2's Conv2d with norm and activation) must
    take S from the gradient of its operation's result, not of its output after the submodules.
    The hooks take it at the input of the first submodule its forward calls (hooks.py,
    ``_submodule_hook``), which is that result when the submodules follow the operation; when
    that submodule is given the layer's own input (it runs before the operation), at the output.
    A forward that does otherwise (functional ops between the operation and its first submodule)
    needs a layer kind of its own, so one warning at construction names such modules and their
    submodules (those in ``known`` already named); returns all of them.  torch's
    parametrizations (weight_norm, spectral_norm) compute the weight, not the output, and are
    not counted (``layers.submodules``)."""
    names = set()
    for lay in layers:
        subs = [n for n, _ in submodules(lay.module)]
        if subs:
            names.add(f"{lay.name} ({type(lay.module).__name__}: {', '.join(subs)})")
    new = sorted(names - known)
    if new:
        warn_user(f"AdaFisher: hooked layers with submodules of their own: {', '.join(new)}. "
                  f"Their output-gradient statistics (S) are taken at the input of the first "
                  f"submodule their forward calls: exact when the submodules follow the "
                  f"layer's own operation, as in timm's BatchNormAct2d (NOTE: [composite "
                  f"layers]); a class whose forward does otherwise needs a layer kind.")
    return names


def state_dtype(params: List[torch.Tensor]) -> torch.dtype:
    """The curvature state's dtype: float64 when a parameter is (SPEC 3), else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


class FisherState:
    def __init__(self, model: nn.Module, preset, params: List[torch.Tensor],
                 previous: Optional["FisherState"] = None):
        """The state for ``params`` (the optimizer's, in group order).  ``previous``: the state
        this one replaces (NOTE: [added groups] in optimizer.py); its layers' contents carry over
        and only layers it did not warn about are warned about."""
        self.preset = preset
        dtype = state_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        # on the meta device the state is made on the CPU and then moved (NOTE: [meta state]):
        # meta tensors hold no values, and the layout's tables must outlive the model's move off it
        on_meta, device = device.type == "meta", (torch.device("cpu") if device.type == "meta"
                                                  else device)
        if previous is not None and previous.buf.is_meta:
            previous.to(device, previous.buf.dtype)
        trainable = {id(p) for p in params}
        self.layers: List[Layer] = []
        local_maps = []                     # (param, layer index, local map, its name)
        specs: List[FactorSpec] = []
        # NOTE: [shared parameters] A parameter of several hooked modules (tied input and output
        # embeddings) takes its factors from the first of them in named_modules() order.  A
        # later module of the same type and factors whose parameters are all that layer's (T5's
        # and BART's encoder and decoder embed_tokens, tied to an unused `shared` Embedding) is
        # an alias: its calls add to the layer's statistics, as calls of one module do.  The
        # others (a Linear head tied to an Embedding) gather no statistics for it.
        claimed: Dict[int, int] = {}            # id(param) -> index of the layer that owns it
        warn_unmatched_names()
        for name, m in model.named_modules():
            kind = kind_of(m)
            if kind is None or not kind.supported(m, preset) or not kind.probe(m):
                continue
            all_maps = kind.param_maps(m, preset)
            unknown = [pn for pn in all_maps if not hasattr(m, pn)]
            if unknown:
                raise ValueError(f"AdaFisher: {type(kind).__name__}.param_maps of "
                                 f"'{name or '<root>'}' ({type(m).__name__}) maps {unknown}, "
                                 f"which {type(m).__name__} does not have")
            found = {pn: _mapped_param(m, pn) for pn in all_maps}     # NOTE: [pruned parameters]
            mapped = {pn: mp for pn, mp in all_maps.items()
                      if found[pn] is not None and id(found[pn]) in trainable}
            maps = {pn: mp for pn, mp in mapped.items() if id(found[pn]) not in claimed}
            if not maps:
                owner = {claimed[id(found[pn])] for pn in mapped}
                if len(owner) == 1 and self._alias(m, kind, preset, self.layers[min(owner)]):
                    self.layers[min(owner)].aliases.append(m)
                continue
            for pn, mp in maps.items():
                claimed[id(found[pn])] = len(self.layers)
                local_maps.append((found[pn], len(self.layers), mp, pn))
            hs = kind.factors(m, preset)
            if not (isinstance(hs, (tuple, list)) and len(hs) == 2
                    and all(isinstance(sp, FactorSpec) for sp in hs)):
                raise TypeError(f"AdaFisher: {type(kind).__name__}.factors of '{name or '<root>'}' "
                                f"({type(m).__name__}) returned {hs!r}: it must return "
                                f"(H, S), two FactorSpecs")
            h, s = hs
            _check_spec(h, "H", kind, name, m)
            _check_spec(s, "S", kind, name, m)
            specs += [h, s]
            self.layers.append(Layer(name, m, kind, slice(0), slice(0), 0, 0, slice(0), slice(0),
                                     pnames=tuple(maps)))
        self.factor_free = {f"{name or '<root>'} ({type(m).__name__})": _factor_free_reason(m, preset)
                            for name, m in model.named_modules()
                            if any(id(p) in trainable and id(p) not in claimed
                                   for p in m.parameters(recurse=False))}
        _warn_factor_free(self.factor_free, preset, previous.factor_free if previous else {})
        self.composite = _warn_composite(self.layers, previous.composite if previous else set())

        # lay the factors out flat: accumulators, then counts; raw/state factor after factor
        n_acc = sum(sp.acc_size for sp in specs)
        acc_off = raw_off = 0
        cols = {k: [] for k in ("src", "dst", "pow", "coef", "q", "factor")}
        factor_start, degree = [0], []
        for f, sp in enumerate(specs):
            for src, dst, pw, coef, q in sp.terms:
                for k, v in zip(cols, (acc_off + src, raw_off + dst, pw, coef, q, f)):
                    cols[k].append(v)
            degree += [sp.grad_degree] * sp.acc_size
            layer = self.layers[f // 2]
            acc, raw = slice(acc_off, acc_off + sp.acc_size), slice(raw_off, raw_off + sp.size)
            if f % 2 == 0:
                layer.h_acc, layer.h_raw, layer.h_factor = acc, raw, f
            else:
                layer.s_acc, layer.s_raw, layer.s_factor = acc, raw, f
            acc_off += sp.acc_size
            raw_off += sp.size
            factor_start.append(raw_off)
        nf = len(specs)
        i64 = dict(dtype=torch.int64, device=device)
        fl = dict(dtype=dtype, device=device)
        self.table = LayerTable.build(
            n_acc, torch.tensor(cols["src"], **i64), torch.tensor(cols["dst"], **i64),
            torch.tensor(cols["pow"], **fl), torch.tensor(cols["coef"], **fl),
            torch.tensor(cols["q"], **fl), torch.tensor(cols["factor"], **i64),
            factor_start, torch.arange(nf, **i64) // 2, len(self.layers))
        # the float columns unrounded, so that a cast to float64 (NOTE: [following the model])
        # gives the table a float64 construction gives
        self._terms = torch.tensor([cols["pow"], cols["coef"], cols["q"]], dtype=torch.float64)
        self._tables = [self.table]         # what the finalizer forgets (kernel_host.forget)
        weakref.finalize(self, kernel_host.forget, self._tables)
        self.grad_degree = torch.tensor(degree + [0] * nf, **fl)
        self.buf = torch.zeros(n_acc + nf, **fl)
        self.dirty = self.gathering = True      # NOTE: [clean buffer]
        self._acc_views = (None, {})        # (buf, {factor: buf[its accumulators]}): acc()
        self.n_acc = n_acc
        self.pending = [0] * nf             # row counts not yet in buf (NOTE: [host row counts])
        self._pending_any = self._flush_queued = False
        # NOTE: [forward before zero_grad]
        self.generation, self.forwarded, self.held, self.in_closure = 0, False, None, False
        self.generation_t: Optional[torch.Tensor] = None       # NOTE: [compiled autograd]
        self.backward_done, self.before, self.witness, self.stash = False, None, [], None
        # NOTE: [compiled forward before zero_grad]
        self.compiled: Optional[bool] = None
        self.held_h = None
        owner = torch.full((n_acc + nf,), len(self.layers), dtype=torch.int64)
        for i, lay in enumerate(self.layers):       # the layer of each H entry (accumulators
            owner[lay.h_acc] = i                    # and row count), len(layers) elsewhere
            owner[n_acc + lay.h_factor] = i
        self.h_owner = owner.to(device)
        self.params = params
        self.state = torch.ones(raw_off, **fl)
        self.fac = torch.ones(raw_off + 1, **fl)    # fac[raw_off] = 1: factor-free params' S and H
        self.initialized = torch.zeros(nf, dtype=torch.bool, device=device)
        self.counters = torch.zeros(len(self.layers), 2, **i64)   # stat iters, non-finite skips

        # per-parameter index maps, made global; everything else is factor-free
        self.meta: Dict[int, tuple] = {}
        for p, li, (rows, cols_, s_off, s_r, s_c, h_off, h_r, h_c, h_gr, h_gs), pn in local_maps:
            lay = self.layers[li]
            self.meta[id(p)] = (rows, cols_, lay.s_raw.start + s_off, s_r, s_c,
                                lay.h_raw.start + h_off, h_r, h_c, h_gr, h_gs, 0)
            _check_map(self.meta[id(p)], p, lay, pn)
        self.owner: Dict[int, Layer] = {id(p): self.layers[li] for p, li, _, _ in local_maps}
        self.free = {id(p) for p in params} - set(self.meta)
        for p in params:
            if id(p) in self.free:
                n = p.numel()
                self.meta[id(p)] = (n, 1, raw_off, 0, 0, raw_off, 0, 0, max(n, 1), 0, 0)
        if previous is not None:
            self._adopt(previous)
        self._held_off_meta: Optional[dict] = None
        if on_meta:
            self.to(torch.device("meta"), dtype)

    @staticmethod
    def _alias(m: nn.Module, kind: LayerKind, preset, lay: Layer) -> bool:
        """Whether ``m``, whose mapped parameters all belong to ``lay``, is an alias of it: the
        same type, factors and parameter maps, every one of its mapped parameters the layer
        module's own, and no submodules (NOTE: [shared parameters])."""
        own = lay.module
        if type(m) is not type(own) or submodules(m) or submodules(own):
            return False
        maps = kind.param_maps(m, preset)
        return (maps == kind.param_maps(own, preset)
                and kind.factors(m, preset) == kind.factors(own, preset)
                and all(_mapped_param(m, pn) is _mapped_param(own, pn) for pn in maps))

    def _adopt(self, old: "FisherState") -> None:
        """Copy, for every layer that ``old`` has too (the same module), its raw statistics and
        row counts, EMA state, H'/S', initialized flags and counters (NOTE: [added groups])."""
        self.compiled, self.dirty = old.compiled, True
        before = {id(l.module): (j, l) for j, l in enumerate(old.layers)}
        for i, new in enumerate(self.layers):
            j, lay = before.get(id(new.module), (None, None))
            if lay is None:
                continue
            for a, b in ((new.h_acc, lay.h_acc), (new.s_acc, lay.s_acc)):
                self.buf[a].copy_(old.buf[b])
            for a, b in ((new.h_raw, lay.h_raw), (new.s_raw, lay.s_raw)):
                self.state[a].copy_(old.state[b])
                self.fac[a].copy_(old.fac[b])
            for a, b in ((new.h_factor, lay.h_factor), (new.s_factor, lay.s_factor)):
                self.buf[self.n_acc + a].copy_(old.buf[old.n_acc + b])
                self.initialized[a].copy_(old.initialized[b])
            self.counters[i].copy_(old.counters[j])

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def shard_meta(row: tuple, full_shape, start: int, length: int, name: str) -> tuple:
        """The meta row of the dim-0 slice [start, start + length) of a parameter (an FSDP2
        shard).

        The shard is rows [ro, ro + n) of the (rows x cols) view when dim-0 slices are whole rows:
        the offsets shift by ro, and a grouped map (grouped convs, the exposed attention's packed
        q/k/v) by ro's group, the phase h_ph taking ro's row in it.  A shard inside one row (a
        vector viewed as one row: preset="official"'s LayerNorm weight) is that row's columns
        [c0, c0 + size): the offsets shift by c0."""
        rows, cols, s_off, s_r, s_c, h_off, h_r, h_c, h_gr, h_gs, h_ph = row
        inner = math.prod(full_shape[1:])
        if inner % cols:
            lo, size = start * inner, length * inner
            r0, c0 = divmod(lo, cols)
            if size and (lo + size - 1) // cols != r0:
                raise NotImplementedError(f"parameter '{name}': a dim-0 shard neither covers whole "
                                          f"rows of its ({rows} x {cols}) Fisher view nor lies "
                                          f"within one row")
            return (1 if size else 0, max(size, 1), s_off + r0 * s_r + c0 * s_c, s_r, s_c,
                    h_off + r0 * h_r + ((r0 + h_ph) // h_gr) * h_gs + c0 * h_c, h_r, h_c, 1, 0, 0)
        ro, n = start * inner // cols, length * inner // cols
        group, phase = divmod(ro + h_ph, h_gr)
        return (n, cols, s_off + ro * s_r, s_r, s_c, h_off + ro * h_r + group * h_gs, h_r, h_c,
                h_gr, h_gs, phase if h_gs else 0)

    # NOTE: [host row counts] Each statistics call also counts the rows it added (a Python int
    # from the shapes).  Added on the device, that was one one-element kernel per hook (82 per
    # statistics iteration of a ResNet-18), a tenth of the time the statistics may take (SPEC 8).
    # In eager mode the hooks add it to ``pending`` on the host instead, and ``flush_rows``
    # uploads all of them with one copy (pinned memory, no stall) and one add: at the end of
    # every backward pass (an autograd-engine callback queued by the first gradient hook), and in
    # an eager ``step()`` and ``raw_stats()`` for counts of a forward without a backward.  A
    # compiled model or a CUDA-graph capture runs no Python on replay, so there the hooks add
    # on the device, inside the graph, as before.
    def acc(self, f: int, where: slice, compiling: bool) -> torch.Tensor:
        """``buf[where]``, factor f's accumulators.  Eagerly a view made once per buffer (a
        slice cost the hooks 2-3 us a call; NOTE: [launch plans] in fisher_kernels/host.py);
        ``compiling``: traced, the slice itself."""
        if compiling:
            return self.buf[where]
        self.dirty = True                   # NOTE: [clean buffer]
        if self._acc_views[0] is not self.buf:
            self._acc_views = (self.buf, {})
        views = self._acc_views[1]
        v = views.get(f)
        if v is None:
            v = views[f] = self.buf[where]
        return v

    def add_rows(self, f: int, rows, compiling: bool) -> None:
        """Add ``rows`` to the row count of factor ``f`` (NOTE: [host row counts]);
        ``compiling``: torch.compile traces this call."""
        if compiling or (self.buf.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.buf[self.n_acc + f:self.n_acc + f + 1].add_(rows)
            if not compiling:
                self.dirty = True
        else:
            self.pending[f] += rows
            self._pending_any = True

    def flush_after_backward(self) -> None:
        """From a gradient hook: flush the pending row counts when this backward pass ends (a
        compiled backward adds its own on the device; step() flushes those of eager forwards)."""
        if self._pending_any and not self._flush_queued and not torch.compiler.is_compiling():
            self._flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self.flush_rows()
        self.backward_done = True           # NOTE: [forward before zero_grad]
        self.witness = [p for p in self.params if p.grad is not None]
        if self.compiled is None:   # an eager backward, no compiled one before it: NOTE:
            self.compiled, self.held_h = False, None    # [compiled forward before zero_grad]

    def note_forward(self) -> None:
        """An eager statistics forward (NOTE: [forward before zero_grad])."""
        # a backward that raised never ran its queued end-of-backward callback: finished too
        died = self._flush_queued and torch._C._current_graph_task_id() == -1
        if self.backward_done and self.witness and all(p.grad is None for p in self.witness):
            self.clear()                    # the module's zero_grad() ran
        elif self.backward_done or died:
            self.flush_rows()
            self.before = self.buf.clone()
            self.buf.zero_()                # in place: compiled graphs hold this tensor
            self.backward_done = False
        self.forwarded = True

    def flush_rows(self, buf: Optional[torch.Tensor] = None) -> None:
        """Move the pending row counts into ``buf`` (default: ours; NOTE: [host row counts]),
        and what a forward set aside (NOTE: [forward before zero_grad])."""
        buf = self.buf if buf is None else buf
        self._flush_queued = False
        if self.before is not None:
            buf.add_(self.before)
            self.before, self.dirty = None, True
        if not self._pending_any:
            return
        self.dirty = True
        # on the host whatever torch's default device is: it is pinned and copied below
        counts = torch.tensor(self.pending, dtype=buf.dtype, device="cpu")
        if buf.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("AdaFisher: row counts gathered before this CUDA-graph capture "
                                   "would be added again on every replay; call zero_grad() or "
                                   "step() before capturing (NOTE: [host row counts])")
            counts = counts.pin_memory().to(buf.device, non_blocking=True)
        buf[self.n_acc:].add_(counts)
        self.pending = [0] * len(self.pending)
        self._pending_any = False

    # NOTE: [forward before zero_grad] Statistics follow the gradients (SPEC 3): zero_grad() drops
    # what was gathered since the last step, so that an abandoned forward/backward (a skipped
    # batch, an evaluation pass with grad enabled) adds nothing to the next step.  But a forward
    # whose backward runs after zero_grad() (``loss = model(x); opt.zero_grad();
    # loss.backward()``, a common loop order, and Lightning's closure) gives the step its
    # gradients, and lost its H.  So zero_grad() after an eager statistics forward keeps a copy
    # of the buffer (one small device copy, no sync), and the first gradient hook of a call from
    # before it (the call's generation, counted in clears, is older) adds its layer's held H
    # back: accumulators and row counts.  Held H that no gradient asks for is dropped by the
    # step, or by a zero_grad() after another forward (a second zero_grad() right after the
    # first keeps it).  Only what forwards after the last finished backward added is held: the
    # first forward after a backward sets the buffer aside (a copy, then zero; gradient accumulation
    # pays one per micro-batch on statistics iterations) and the end of the next backward, or
    # any flush, adds it back; zero_grad() drops it.  So an abandoned forward + backward before
    # the step's forward is dropped, as in the usual order (subtracting a copy instead turned an
    # overflowed batch's inf into NaN).  A grad-enabled forward without a backward (an
    # evaluation) cannot be told from the step's own: it is held with it.
    # A module's zero_grad() (``model.zero_grad()``: the pytorch/examples DCGAN loop zeroes the
    # discriminator so, after the generator's backward ran through it) does not call ours.  The
    # first forward after a backward finds it out: the parameters that had gradients when that
    # backward ended have none now (all of them: user code may drop one tensor's gradient), so
    # the gradients were set to None, and what was gathered is dropped as zero_grad() drops it.
    # Only there, and only in an eager forward (a compiled one runs no Python before its
    # statistics ops): a module's zero_grad() between a forward and its backward, after a
    # forward without one, or before a compiled forward is not seen, nor
    # zero_grad(set_to_none=False) (DDP writes the all-reduced gradients in place after our
    # end-of-backward callback).
    # Inside step(closure), zero_grad() clears only the gradients and what was gathered before
    # step() began: the closure's forward before it is the step's (Lightning's closure runs
    # forward, zero_grad(), backward), and a closure without zero_grad() (the last micro-batch
    # of an accumulation) adds to what came before.  So step(closure) sets the buffer aside
    # (``stash``, with its generation: the closure's calls are a newer one), a zero_grad() in
    # the closure holds it as zero_grad() holds (a gradient of a call from before step() takes
    # its H back; what a forward had set aside from an earlier backward is dropped, not held),
    # and the end of the closure adds back a stash no zero_grad() took.  (Eager forwards only:
    # what a compiled model gathered before step(closure) is not seen.)  A compiled model's
    # gradient hook is one opaque op that knows no call's generation: NOTE: [compiled forward
    # before zero_grad].
    #
    # NOTE: [compiled forward before zero_grad] A compiled forward runs no Python that could note
    # it, and its hooks cannot set a flag for it either (dynamo replays such a store after the
    # graph, but refuses one inside activation checkpointing's subgraph; a flag set where the
    # backward is traced misses graphs loaded from torch's compile caches).  So each
    # zero_grad() of a statistics iteration keeps the buffer's H, ``held_h``, per layer where
    # it has rows (the first after a step copies the buffer, later ones take what has rows
    # since), and step() gives each layer with output-gradient rows but no activation rows the
    # H and rows held for it (``restore_h``).  The loop order forward, zero_grad(), backward,
    # step() then trains as the usual one.  Cost: about ten small launches per statistics
    # iteration, no sync, for compiled models only (``compiled``: True once a compiled
    # backward's statistics op has run, False once an eager statistics backward ended before
    # any had; an eager model holds nothing from then on, so that a compiled step() sees the
    # same held state at every statistics step and compiles once).  Per layer, not per call
    # as in eager mode: held H never adds to H the step has, so a grad-enabled evaluation
    # forward before zero_grad() in the usual order does not leak in, and with gradient
    # accumulation in the forward-first order the first micro-batch's H gives way to the later
    # micro-batches' (their mean stands for the step's).  A zero_grad() inside a compiled
    # function keeps nothing.
    # NOTE: [clean buffer] A plain iteration (steps % TCov != 0) gathers nothing, so its
    # zero_grad() and step() found the buffer zero already, and each zeroed it again: two memset
    # launches per iteration that AdamW does not make, all the extra launches of TCov = 100.
    # So ``clear`` zeroes the buffer only where it may hold something: while statistics are
    # gathered (``gathering``, StatHooks.set_steps: a compiled forward writes them with no Python
    # to say so), or when ``dirty``, which every eager write sets (the hooks' ``acc``, row counts,
    # held and stashed buffers, a move or adoption) and so does a change of the gating from
    # outside step() (set_steps after CUDA-graph replays, which write with no Python either; a
    # new TCov; a loaded checkpoint); and always while torch.compile traces or a CUDA graph is
    # captured, which record the memset for every replay.
    def clear(self, hold: bool = False) -> None:
        """Zero the buffer (where it may hold anything: NOTE: [clean buffer]) and the pending row
        counts; ``hold`` (zero_grad()): NOTE: [forward before zero_grad]."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            if hold and self.forwarded:
                self.held = (self.generation, self.buf.clone(), list(self.pending), set())
            elif not hold:      # a second zero_grad() with no forward between keeps what it held
                self.held = None
            if not hold:
                self.held_h = None
            self.new_generation()
            self.forwarded = self.backward_done = False
            self.before = None
        if compiling or self.dirty or self.gathering or kernel_host.capturing():
            self.buf.zero_()
        if not compiling:
            self.dirty = False
            if self._pending_any:
                self.pending = [0] * len(self.pending)
            # also re-arms the callback of a backward pass that raised before running it
            self._pending_any = self._flush_queued = False

    def enter_closure(self) -> None:
        """step(closure) calls its closure (NOTE: [forward before zero_grad])."""
        self.in_closure = True
        if torch.compiler.is_compiling():
            return
        if self.forwarded or self.backward_done or self._pending_any or self.before is not None:
            before, self.before = self.before, None     # what a zero_grad() drops, not holds
            self.flush_rows()
            self.stash = (self.generation, self.buf.clone(), before)
            self.buf.zero_()
            self.new_generation()
            self.forwarded = self.backward_done = False

    def zero_grad_in_closure(self) -> None:
        if self.stash is not None:
            self.held = (self.stash[0], self.stash[1], [0] * len(self.pending), set())
            self.stash = None

    def exit_closure(self) -> None:
        self.in_closure = False
        if self.stash is not None:
            for t in self.stash[1:]:
                if t is not None:
                    self.buf.add_(t)
            self.stash, self.dirty = None, True

    def _h_entries(self, per_layer: torch.Tensor) -> torch.Tensor:
        """bool [n_layers] -> bool [len(buf)]: each layer's value on its H entries, False on the
        others (row counts buf[n_acc:]: factor 2i is layer i's H, 2i + 1 its S)."""
        return torch.cat([per_layer, per_layer.new_zeros(1)])[self.h_owner]

    def hold_h(self) -> None:
        """zero_grad() of a statistics iteration: NOTE: [compiled forward before zero_grad]."""
        if self.compiled is False or torch.compiler.is_compiling():
            return
        if self.held_h is None:
            self.held_h = self.buf.clone()
        else:
            has_h = self._h_entries(self.buf[self.n_acc:][0::2] > 0)
            self.held_h = torch.where(has_h, self.buf, self.held_h)

    def with_held_h(self) -> torch.Tensor:
        """``buf`` as step() reads it: each layer with output-gradient rows and no activation rows
        takes the H accumulators and rows of ``held_h`` (NOTE: [compiled forward before
        zero_grad]); ``buf`` itself when nothing is held."""
        if self.held_h is None:
            return self.buf
        rows = self.buf[self.n_acc:]
        missing = self._h_entries((rows[0::2] == 0) & (rows[1::2] > 0))
        return torch.where(missing, self.held_h, self.buf)

    def restore_h(self) -> None:
        """step(): ``buf`` becomes ``with_held_h()``, and nothing stays held."""
        if self.held_h is not None:
            self.buf.copy_(self.with_held_h())
            self.held_h, self.dirty = None, True

    def new_generation(self) -> None:
        """A clear: the forwards after it are a new generation (NOTE: [forward before
        zero_grad])."""
        self.generation += 1
        self.generation_t = None

    def generation_tensor(self) -> torch.Tensor:
        """``generation`` in a CPU tensor of its own, made by the first statistics forward of a
        generation (not at every clear: 24k instructions, 1.5% of a ResNet-18 step()'s), for the
        gradient hooks that compiled autograd traces (NOTE: [compiled autograd] in hooks.py)."""
        if self.generation_t is None:
            self.generation_t = torch.tensor(self.generation, device="cpu")
        return self.generation_t

    def adopt_held(self, lay: Layer, generation: int) -> None:
        """A gradient reached a call of ``lay`` from the forward of ``generation``, before the
        last clear: the layer takes back the H that clear held (NOTE: [forward before zero_grad])."""
        held = self.held
        if held is None or held[0] != generation or lay.h_factor in held[3]:
            return
        _, buf, pending, adopted = held
        adopted.add(lay.h_factor)
        self.dirty = True
        count = slice(self.n_acc + lay.h_factor, self.n_acc + lay.h_factor + 1)
        with torch.no_grad():
            self.buf[lay.h_acc].add_(buf[lay.h_acc])
            self.buf[count].add_(buf[count])
        if pending[lay.h_factor]:
            self.pending[lay.h_factor] += pending[lay.h_factor]
            self._pending_any = True

    def describe(self) -> List[dict]:
        """Per layer: name, kind and factor sizes (a checkpoint's fingerprint of the model)."""
        return [{"name": l.name, "kind": _model_class(l.module).__name__,
                 "h_size": l.h_raw.stop - l.h_raw.start, "s_size": l.s_raw.stop - l.s_raw.start}
                for l in self.layers]

    _MOVED = ("grad_degree", "buf", "state", "fac", "initialized", "counters", "before", "h_owner")

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Moves every tensor of the state to ``device``, its floating ones in ``dtype`` (NOTE:
        [following the model] in optimizer.py).

        NOTE: [meta state] A move to the meta device keeps the tensors it replaces, and a move
        off it starts from those: meta tensors hold no values, and a model built on the meta
        device (or moved there) and then materialised (``to_empty``, FSDP2's large-model
        initialisation) needs its state's tables and initial values back.  What happened on
        the meta device is dropped with it."""
        def to(v):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        if device.type == "meta" and not self.buf.is_meta:
            self._held_off_meta = {k: getattr(self, k) for k in self._MOVED + ("table",)}
        elif device.type != "meta" and self.buf.is_meta:
            for k, v in self._held_off_meta.items():
                setattr(self, k, v)
            self._held_off_meta = None
        kernel_host.forget(self._tables)
        pw, coef, q = self._terms.to(device, dtype)
        self.table = type(self.table)(*(to(v) if isinstance(v, torch.Tensor) else v
                                        for v in self.table))._replace(
            term_pow=pw, term_coef=coef, term_q=q)
        self._tables[:] = [self.table]
        for name in self._MOVED:
            v = getattr(self, name)
            setattr(self, name, None if v is None else to(v))
        self.held = self.held_h = None
        self.dirty = True

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"state": self.state, "fac": self.fac, "initialized": self.initialized,
                "counters": self.counters}
