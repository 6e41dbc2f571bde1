"""AdaFisher and AdaFisherW (SPEC section 1): thin classes over the registry (layers.py), the flat
state (state.py), the hooks (hooks.py) and the backend's ops (backends.py)."""
from __future__ import annotations

import functools
import math
import numbers
import sys
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from . import reference
from .backends import resolve
from .hooks import _DATA_PARALLEL, StatHooks
from .layers import dtensor_types, warn_user
from .presets import PRESETS
from .report import curvature_report
from .state import FisherState, state_dtype

_GROUP_KEYS = ("lr", "beta", "weight_decay")
# what torch's LR schedulers ("initial_lr", for resuming with last_epoch) and users (a group's
# "name") may add to a group besides its hyper-parameters
_GROUP_EXTRAS = ("initial_lr", "name")


def _check_hparams(lr, beta, Lambda, gamma, TCov, weight_decay, where: str = "") -> None:
    """Types and ranges, errors prefixed with ``where``; a tensor lr's value is read (a sync for
    a GPU tensor) where a group is made; at each step only a CPU one's (``_gather``; NOTE:
    [tensor lr] in kernel_host.py)."""
    def real(name, v):          # numbers.Real: NumPy's scalars too
        if isinstance(v, torch.Tensor):
            raise TypeError(f"{where}{name} must be a Python or NumPy real number, got a tensor: "
                            f"only lr may be a tensor")
        # comparisons, not math.isfinite: a compiled step() traces them when dynamo has made an
        # edited float symbolic (NaN fails both)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -math.inf < v < math.inf:
            raise TypeError(f"{where}{name} must be a finite real number, got {v!r}")
    if isinstance(lr, torch.Tensor):
        reference.check_lr(lr, lr.device, where.rstrip(": ") or "lr")   # device: at each step
        lr = lr.item()
    for name, v in (("lr", lr), ("beta", beta), ("Lambda", Lambda), ("gamma", gamma),
                    ("weight_decay", weight_decay)):
        real(name, v)
    if lr < 0:
        raise ValueError(f"{where}lr must be >= 0, got {lr}")
    if not 0 <= beta < 1:
        raise ValueError(f"{where}beta must be in [0, 1), got {beta}")
    if Lambda <= 0:
        raise ValueError(f"{where}Lambda must be > 0 (it damps F = S'H' + Lambda), got {Lambda}")
    if not 0 < gamma <= 1:
        raise ValueError(f"{where}gamma must be in (0, 1], got {gamma}")
    if weight_decay < 0:
        raise ValueError(f"{where}weight_decay must be >= 0, got {weight_decay}")
    if isinstance(TCov, bool) or not isinstance(TCov, numbers.Integral) or TCov < 1:
        raise ValueError(f"{where}TCov must be an integer >= 1, got {TCov!r}")


_PASSING = dict(lr=0.0, beta=0.0, Lambda=1.0, gamma=1.0, TCov=1, weight_decay=0.0)


def _setting(name: str, cast, then=None):
    """An optimizer setting (Lambda, gamma, TCov) checked where it is set: the constructor, a hand
    edit between steps (under the paper preset ``opt.Lambda = 0`` made F = S'H' = 0 where min-max
    put an entry at 0, so non-finite parameters; ``opt.TCov = 0`` a ZeroDivisionError in step),
    a loaded checkpoint (checked before anything loads); then ``then(optimizer)``, if given."""
    def set_(self, v):
        _check_hparams(**{**_PASSING, name: v})
        setattr(self, "_" + name, cast(v))
        if then is not None:
            then(self)
    return property(lambda self: getattr(self, "_" + name), set_)


def _regate(opt) -> None:
    """After a new TCov: the next iteration's gating (NOTE: [TCov gating]), which step() set
    with the old one."""
    if hasattr(opt, "_hooks"):          # (not while the constructor runs)
        opt._hooks.set_steps(opt.steps, opt.TCov)


def _plain(v):
    """A group's value as kept: a float, or a tensor lr as given, shared as torch's optimizers
    share it (NOTE: [tensor lr] in kernel_host.py)."""
    return v if isinstance(v, torch.Tensor) else float(v)


def _check_params(params: List[torch.Tensor], names: Dict[int, str]) -> None:
    for p in params:
        if is_lazy(p):
            raise ValueError(f"model: parameter '{names[id(p)]}' belongs to a lazy module (e.g. "
                             f"nn.LazyLinear) that has not run yet, so its shape and its layer's "
                             f"curvature factors are unknown; run one forward pass before "
                             f"constructing the optimizer (or adding its group)")
        if p.is_complex():
            raise TypeError(f"model: parameter '{names[id(p)]}' is complex; AdaFisher supports real "
                            f"floating-point parameters only")
        if not p.is_floating_point():
            raise TypeError(f"model: parameter '{names[id(p)]}' has dtype {p.dtype}; expected a "
                            f"floating-point dtype")


def _check_group(where: str, g: Any, of_model: set, seen: set, names: Dict[int, str],
                 skip_frozen: bool) -> Dict[str, Any]:
    """A copy of group ``g`` with its params as a list, after checking its keys and values, and
    that each item is a parameter of the model (ids ``of_model``; or a (name, parameter) pair,
    as torch's optimizers take) not in ``seen`` (ids, updated).  A frozen parameter is left out where
    ``skip_frozen`` (the constructor: SPEC 7 ignores frozen parameters, and NOTE: [unfrozen]
    names it if it is unfrozen later), else refused (add_param_group: it asked for training)."""
    if not isinstance(g, dict) or "params" not in g:
        raise TypeError(f"{where} must be a dict with a 'params' entry")
    extra = set(g) - {"params", *_GROUP_KEYS, *_GROUP_EXTRAS}
    if extra:
        raise ValueError(f"{where} has keys {sorted(extra)}; a group may only override "
                         f"{_GROUP_KEYS}")
    if isinstance(g["params"], (set, frozenset)):
        raise TypeError(f"{where}['params'] is a set, whose order changes from run to run (and "
                        f"so would checkpoints); give a list")
    if isinstance(g["params"], nn.Module):
        raise TypeError(f"{where}['params'] is an nn.Module; give its parameters, "
                        f"module.parameters()")
    items = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
    kept, mine = [], set()
    for i, item in enumerate(items):
        named = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
        p = item[1] if named else item
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}['params'][{i}] is {type(item).__name__}; expected a "
                            f"parameter of the model or a (name, parameter) pair")
        if id(p) not in of_model:
            raise ValueError(f"{where}['params'][{i}] is a tensor of shape {tuple(p.shape)} that "
                             f"is not a parameter of the model")
        if not p.requires_grad:
            if skip_frozen:
                continue
            raise ValueError(f"{where}: parameter '{names[id(p)]}' is frozen (requires_grad="
                             f"False); unfreeze it before adding it")
        if id(p) in seen:
            where_else = "twice in this group" if id(p) in mine else "already in an earlier group"
            raise ValueError(f"{where}: parameter '{names[id(p)]}' is {where_else}")
        seen.add(id(p))
        mine.add(id(p))
        kept.append(item)
    _check_params([it[1] if isinstance(it, tuple) else it for it in kept], names)
    _check_hparams(g.get("lr", 0.0), g.get("beta", 0.0), 1.0, 1.0, 1, g.get("weight_decay", 0.0),
                   f"{where}: ")
    # plain floats: a NumPy scalar would not load from a checkpoint with weights_only=True
    out = {**g, **{k: _plain(g[k]) for k in _GROUP_KEYS if k in g}, "params": kept}
    if not kept and any(isinstance(it, tuple) for it in items):
        out["param_names"] = []         # named, all frozen: torch names groups all or none
    return out


def _build_groups(model: nn.Module, param_groups: Optional[List[Dict[str, Any]]]):
    """Every trainable parameter in exactly one group; unlisted ones form a last default group."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    _check_params(trainable, names)
    if param_groups is None:
        return [{"params": trainable}], names
    if not isinstance(param_groups, (list, tuple)):
        raise TypeError(f"param_groups must be a list of dicts, got {type(param_groups).__name__}")
    seen, of_model = set(), set(names)
    groups = [_check_group(f"param_groups[{i}]", g, of_model, seen, names, skip_frozen=True)
              for i, g in enumerate(param_groups)]
    rest = [p for p in trainable if id(p) not in seen]
    if rest:    # named where the user's groups are: torch takes names in all groups or none
        named = any("param_names" in g or any(isinstance(it, tuple) for it in g["params"])
                    for g in groups)
        groups.append({"params": [(names[id(p)], p) for p in rest] if named else rest})
    return groups, names


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers, so that an optimizer made on a
    wrapper hooks and names the plain model (no "_orig_mod." or "module." prefix: its
    checkpoints and reports are the plain model's); FSDP (v1) refused: it flattens each
    layer's parameters into one, which no factor layout can read; nn.DataParallel over several
    GPUs refused (NOTE: [DataParallel] in hooks.py)."""
    compiled = sys.modules.get("torch._dynamo.eval_frame")
    ddp = getattr(sys.modules.get("torch.nn.parallel.distributed"), "DistributedDataParallel", None)
    while True:
        if compiled is not None and isinstance(model, compiled.OptimizedModule):
            model = model._orig_mod
        elif ddp is not None and isinstance(model, ddp):
            model = model.module
        elif isinstance(model, nn.DataParallel) and len(model.device_ids) <= 1:
            model = model.module         # one device (or none): it calls the module itself
        else:
            break
    if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
        raise NotImplementedError(_DATA_PARALLEL.format(
            f"model: nn.DataParallel over devices {model.device_ids}"))
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel"),
                   "FullyShardedDataParallel", None)
    # FSDP marks its flat parameters, and with use_orig_params the views into them, so
    if (fsdp is not None and any(isinstance(m, fsdp) for m in model.modules())) or \
            any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):
        raise NotImplementedError("model: FSDP (v1, FullyShardedDataParallel) flattens each "
                                  "layer's parameters, which AdaFisher's per-layer factors cannot "
                                  "read; use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP")
    return model


def _listed(names: List[str]) -> str:
    """The first five names, and "and others" after them."""
    return ", ".join(names[:5]) + (" and others" if len(names) > 5 else "")


def _chunk_span(n: int, size: int, rank: int) -> Tuple[int, int]:
    """(start, length) of ``rank``'s piece of n rows split in ``size`` torch.chunk pieces, as
    FSDP2's Shard(0) splits dim 0."""
    chunk = -(-n // size)
    start = min(rank * chunk, n)
    return start, min(chunk, n - start)


def _dim0_shard(p: "DTensor", name: str):
    """(start, length) along dim 0 of this rank's local shard of a DTensor parameter (FSDP2
    shards dim 0 in torch.chunk pieces)."""
    mesh, placements = p.device_mesh, p.placements
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise NotImplementedError(f"parameter '{name}': placements {placements}; AdaFisher supports "
                                  f"1-D meshes with Shard(0) (FSDP2)")
    start, _ = _chunk_span(p.shape[0], mesh.size(), mesh.get_local_rank())
    return start, p.to_local().shape[0]


def _on_wrapped(method):
    """NOTE: [wrapped optimizers] Lightning's LightningOptimizer (what ``self.optimizers()``
    returns in a LightningModule) derives its class from the optimizer's and reads the
    optimizer's attributes through ``__getattr__``, so AdaFisher's methods called on it ran with
    the wrapper as ``self``: ``add_param_group`` appended a group the optimizer had no layout
    for, and whatever a method assigns (a new layout, a device move followed) landed on the
    wrapper.  Such a method runs on the wrapped optimizer, found by the class's ``optimizer``
    property (a lookup on the type, which torch.compile treats as a constant)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if isinstance(getattr(type(self), "optimizer", None), property):
            return getattr(self.optimizer, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)
    return run


class AdaFisher(Optimizer, Joinable):
    """AdaFisher (Martins Gomes et al., ICLR 2025) with L2 weight decay added to the gradient.

    Args (names and defaults of the authors' released code, so it is a drop-in replacement):
        model: the ``nn.Module`` to train (not a parameter list: the optimizer hooks its layers).
        lr, beta: learning rate and momentum of m.  lr may be a one-element tensor, as for
            torch's optimizers, which LR schedulers update in place: a compiled step() then
            needs no recompile and a CUDA graph replays each new value (float32 on the
            parameters' device for that; NOTE: [tensor lr] in kernel_host.py).
        Lambda: damping of F = S'[row] * H'[col] + Lambda.
        gamma: EMA factor of the curvature statistics (its meaning depends on ``preset``).
        TCov: statistics are gathered on iterations where ``steps % TCov == 0``.
        weight_decay: L2 (AdaFisher) or decoupled (AdaFisherW) weight decay.
        dist: all-reduce the statistics across processes (also on with an initialised process group).
        process_group: the ranks whose statistics are averaged: DDP's ``process_group`` when DDP
            runs on a subgroup, or a one-rank group (``new_group([rank])``) for a model that each
            rank trains alone.  Default: the mesh group of FSDP2-sharded parameters, else the
            default group once one is initialised.
        preset: "official" (the released code's numerics) or "paper" (Algorithm 1 of the paper).
        backend: "auto", "torch", "triton" or "cuda" (see ``adafisher_fast.backends``).
        param_groups: optional list of dicts ``{"params": [...], "lr"/"beta"/"weight_decay": ...}``;
            trainable parameters not listed form a last group with the constructor's values.
        check: run the torch reference beside the backend on every op and raise on disagreement
            (also ``ADAFISHER_CHECK=1``); slow, for verifying kernels on your own model.
        capturable: keep step counts on the parameters' device (the GPU kernel backends always do,
            NOTE: [device steps]) so that ``step()`` never syncs with the host and a whole
            iteration can be captured in a CUDA graph (NOTE: [capturable]).
    """
    decoupled = False
    Lambda, gamma = _setting("Lambda", float), _setting("gamma", float)
    TCov = _setting("TCov", int, _regate)
    # NOTE: [GradScaler] Like torch's fused optimizers, step() does its own AMP bookkeeping:
    # torch.amp.GradScaler.step() sets ``self.grad_scale`` (None if the user already called
    # scaler.unscale_) and ``self.found_inf``.  With found_inf the whole step is skipped.  On a
    # statistics iteration with TCov > 1 step() reads it on the host (one sync, as torch's
    # non-fused optimizers do): that iteration's statistics are dropped and steps does not
    # advance, so the next iteration gathers again.  On the other iterations (all of them at
    # TCov = 1, where the next iteration gathers anyway), when the step counts live on the device
    # (the CUDA kernel backends, or capturable=True), the kernels read it themselves, as torch's
    # fused Adam does: layer_ema and fused_step leave the curvature state, parameters, momenta
    # and step counts as they were, nothing waits for the GPU, and such an iteration can be
    # captured in a CUDA graph.  ``steps`` (the TCov phase, on the host) then advances, since the
    # host cannot know.
    # Otherwise gradients are unscaled here and the gradient-side statistics are divided by
    # grad_scale ** degree (the same rule as the DDP scale, FactorSpec.grad_degree).  After a manual
    # scaler.unscale_ the scale is unknown here and the gradient-side statistics keep it; min-max
    # normalisation removes such a constant factor up to its 1e-6 epsilon.
    _step_supports_amp_scaling = True
    # NOTE: [capturable] With capturable=True nothing in step() reads a device value on the host:
    # step counts are 0-dim float32 tensors on the parameter's device and every backend computes
    # the bias correction 1 - beta^t from them on the device; layer_ema reads only tables built once
    # (LayerTable.build), and the kernels' pointer tables are cached on the device, keyed by the
    # pointers (fisher_kernels/fused_step.py, csrc/bindings.cpp).  So forward + backward + step can
    # be captured with torch.cuda.graph and replayed.  What replay cannot do is run Python: the TCov
    # gating (``steps % TCov``, NOTE: [TCov gating]) and ``self.steps`` do not advance during
    # replay, so a captured graph always does what it did at capture.  With TCov > 1 capture two
    # graphs, one on a statistics iteration and one on a plain one (``set_steps``), and replay the
    # first every TCov iterations (README, "torch.compile and CUDA graphs").  GradScaler's skip
    # reads found_inf on the host on statistics iterations with TCov > 1, which cannot be
    # captured then (bf16 autocast needs no scaler); the other iterations read it on the device
    # (NOTE: [GradScaler]).

    def __init__(self, model: nn.Module, lr: float = 1e-3, beta: float = 0.9, Lambda: float = 1e-3,
                 gamma: float = 0.8, TCov: int = 100, weight_decay: float = 0.0, dist: bool = False,
                 preset: str = "official", backend: str = "auto",
                 param_groups: Optional[List[Dict[str, Any]]] = None, check: bool = False,
                 capturable: bool = False, process_group=None):
        if not isinstance(model, nn.Module):
            kind = "a parameter iterable" if isinstance(model, Iterable) else type(model).__name__
            raise TypeError(f"model must be an nn.Module (AdaFisher hooks its layers), got {kind}; "
                            f"pass the model itself, e.g. AdaFisher(model)")
        model = _unwrapped(model)
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError("model is a TorchScript module (torch.jit.script or trace): its forward "
                            "runs as TorchScript, which calls no Python hooks, so no layer could "
                            "gather curvature statistics; make the optimizer on the eager model "
                            "and train that (torch.compile compiles it with the hooks), then "
                            "script or trace it for deployment")
        if next(model.parameters(), None) is None:  # as torch's "empty parameter list"
            raise ValueError(f"model: this {type(model).__name__} holds no parameters, so there is "
                             f"nothing to train; pass the module that holds them (frozen ones "
                             f"are fine: NOTE: [unfrozen])")
        _check_hparams(lr, beta, Lambda, gamma, TCov, weight_decay)
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        for name, flag in (("capturable", capturable), ("check", check), ("dist", dist)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if (dist or process_group is not None) and not (torch_dist.is_available()
                                                       and torch_dist.is_initialized()):
            raise ValueError("dist=True and process_group need an initialised torch.distributed "
                             "process group")
        if process_group is torch_dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(f"process_group: this rank ({torch_dist.get_rank()}) is not a member "
                             f"of the group (new_group returns NON_GROUP_MEMBER to the ranks it "
                             f"leaves out); give each rank a group it belongs to")
        if process_group is not None and not isinstance(process_group, torch_dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got "
                            f"{type(process_group).__name__}")
        groups, self._names = _build_groups(model, param_groups)
        # "capturable" as a group default makes torch's load_state_dict keep steps on the device
        super().__init__(groups, dict(lr=_plain(lr), beta=float(beta),
                                      weight_decay=float(weight_decay), capturable=capturable))
        self.capturable = capturable
        self.Lambda, self.gamma, self.TCov, self.preset = float(Lambda), float(gamma), int(TCov), preset
        self.dist = dist
        self._model = model
        # NOTE: [statistics group] the group the statistics are averaged over; None: the default
        # group, once one is initialised.  FSDP2 shards a parameter over its mesh's group, which
        # is the data-parallel group even when other groups exist.
        meshes = [p.device_mesh for g in groups for p in g["params"]
                  if isinstance(p, dtensor_types())]
        if process_group is None and meshes and meshes[0].ndim == 1:
            process_group = meshes[0].get_group()
        self._stat_group = process_group
        params = [p for g in self.param_groups for p in g["params"]]
        self.fisher = FisherState(model, PRESETS[preset], params)
        self._backend_request, self._check_ops = backend, check
        self._pick_backend(params[0].device if params else torch.device("cpu"))
        self._note_dtypes(params)               # NOTE: [following the model]
        self._hooks = self._hook()
        self._laid_out = self._group_layout()   # NOTE: [adopted groups]
        self._silent_checked = False        # NOTE: [silent layers]
        self._frozen = [p for p in model.parameters() if not p.requires_grad]   # NOTE: [unfrozen]
        self._no_grad, self._replaced_named = 0, set()     # NOTE: [replaced]
        self._meta = ([], torch.zeros((0, len(reference.META_COLS)), dtype=torch.int64))  # _gather
        self._check_shards()
        Joinable.__init__(self)             # NOTE: [uneven inputs]

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls that updated the parameters (NOTE: [TCov gating]); a step
        without any gradient does not count (NOTE: [no gradient]), a plain iteration that
        GradScaler's found_inf skips on the device does (NOTE: [GradScaler])."""
        return self._hooks.steps

    @_on_wrapped
    def set_steps(self, steps: int) -> None:
        """Set the step counter, and with it whether the next iteration gathers statistics
        (``steps % TCov == 0``).  For CUDA-graph loops, where replay runs no Python: capture the
        statistics graph after ``set_steps(0)``, the plain one after ``set_steps(1)``, and after
        replaying call ``set_steps(iterations done)`` (NOTE: [capturable])."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        self._hooks.set_steps(steps, self.TCov)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(preset={self.preset!r}, backend={self.backend!r}, "
                f"Lambda={self.Lambda}, gamma={self.gamma}, TCov={self.TCov}, "
                f"hooked_layers={len(self.fisher.layers)})\n" + super().__repr__())

    def __getstate__(self):
        # torch.optim.Optimizer pickles defaults, state and param_groups only: a copy would lack
        # the hooks and the curvature state and fail at its first step()
        raise TypeError(f"{type(self).__name__} cannot be copied or pickled: it hooks the model's "
                        f"layers; checkpoint it with state_dict() and load that into an optimizer "
                        f"built on the restored model")

    # ------------------------------------------------------------------------------------------
    @_on_wrapped
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group of the model's trainable parameters, e.g. layers unfrozen after the
        optimizer was made (fine-tuning); "params" plus optional "lr", "beta", "weight_decay".

        NOTE: [added groups] The curvature state is laid out for the parameters the optimizer
        trains (state.py), so a new group rebuilds it: layers that now have trainable parameters
        get hooks and fresh factors, and every layer that had state keeps all of it (EMA, H'/S',
        counters, and the statistics gathered since the last step).  The kernels' cached tables
        key on the new layout.  CUDA graphs captured before hold the old buffers: capture again.
        """
        if "fisher" not in self.__dict__:       # Optimizer.__init__ adding the constructor's groups
            return super().add_param_group(param_group)
        self._follow_model()        # a cast since the last step: the state and momentum first
        of_model = self._model_params()
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        group = _check_group("add_param_group", param_group, of_model, seen, self._names,
                             skip_frozen=False)
        super().add_param_group(group)
        self._relayout()

    def _relayout(self) -> None:
        """The curvature state laid out anew for the parameters that param_groups holds, every
        layer that had state keeping all of it, and the hooks made anew (NOTE: [added groups])."""
        old, hooks = self.fisher, self._hooks
        old.flush_rows()                        # NOTE: [host row counts]
        params = [p for g in self.param_groups for p in g["params"]]
        ids = {id(p) for p in params}
        self._frozen = [p for p in self._frozen if id(p) not in ids]
        for p in [p for p in self.state if id(p) not in ids]:
            del self.state[p]                   # left param_groups: state_dict() could not key it
        self.fisher = FisherState(self._model, PRESETS[self.preset], params, old)
        hooks.remove()
        self._hooks = self._hook()
        self._hooks.set_steps(hooks.steps, self.TCov)
        self._note_dtypes(params)           # NOTE: [following the model], for the new layout
        self._laid_out = self._group_layout()

    def _model_params(self) -> set:
        """Ids of the model's parameters now, their names noted (modules added since the
        optimizer was made)."""
        named = list(self._model.named_parameters())
        self._names.update({id(p): n for n, p in named})
        return {id(p) for _, p in named}

    def _group_layout(self) -> tuple:
        """The param_groups list and its groups' sizes: what an edit by hand changes (a group
        appended or removed, the list assigned, a parameter appended), read per zero_grad() and
        step() in well under a microsecond (NOTE: [adopted groups])."""
        return id(self.param_groups), tuple(len(g["params"]) for g in self.param_groups)

    def _adopt_groups(self) -> None:
        """NOTE: [adopted groups] param_groups edited by hand: some training code appends a
        group, and Lightning's BaseFinetuning (BackboneFinetuning) restores the groups of a
        fine-tuning run on resume by assigning ``optimizer.param_groups`` before the checkpoint
        loads.  Parameters of the model that have no curvature layout are laid out at the next
        zero_grad() (so that the next forward gathers their statistics), step(), state_dict()
        or load_state_dict(), as add_param_group would have (missing hyper-parameters from the
        defaults, and checked); anything else in param_groups (a tensor not of the model, a
        parameter twice) is an error that names it, raised before any state changes.  A
        parameter that left param_groups (a group removed) leaves the layout and its momentum
        too, as if the optimizer had been made without it.  Adopted groups may hold frozen
        parameters (Lightning's restored groups do)."""
        seen, new = set(), []
        for gi, g in enumerate(self.param_groups):
            for k, v in self.defaults.items():
                g.setdefault(k, v)
            _check_hparams(g["lr"], g["beta"], 1.0, 1.0, 1, g["weight_decay"],
                           f"param_groups[{gi}]: ")
            for p in g["params"]:
                if id(p) in seen:
                    raise ValueError(f"param_groups holds parameter "
                                     f"'{self._names.get(id(p), '?')}' twice")
                seen.add(id(p))
                if id(p) not in self.fisher.meta:
                    new.append(p)
        if not new and len(seen) == len(self.fisher.meta):
            self._laid_out = self._group_layout()
            return
        of_model = self._model_params()
        for p in new:
            if id(p) not in of_model:
                what = (f"a tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor)
                        else type(p).__name__)
                raise ValueError(f"param_groups holds {what} that is not a parameter of the "
                                 f"model; add parameters with opt.add_param_group(...)")
        self._relayout()

    def _check_shards(self) -> None:
        """Every rank checks every rank's dim-0 shard of each FSDP2 parameter, so that a layout
        the step cannot use (a layer kind's map whose shard is neither whole rows of its Fisher
        view nor within one row) raises here on all ranks alike; found by the one rank whose shard
        it is, at its first step, it left the others waiting in the statistics all-reduce."""
        fisher, sharded = self.fisher, None
        for p in (p for g in self.param_groups for p in g["params"]):
            if not isinstance(p, dtensor_types()) or id(p) not in fisher.meta:
                continue
            name = self._names.get(id(p), "?")
            if sharded is None:
                from torch.distributed.fsdp import FSDPModule
                sharded = {id(q) for m in self._model.modules() if isinstance(m, FSDPModule)
                           for q in m.parameters()}
            if id(p) not in sharded:
                # its gradients may be partial sums, its layers' activations DTensors, and its
                # mesh is not a data-parallel group: nothing of it was checked
                raise NotImplementedError(
                    f"parameter '{name}' is a DTensor ({p.placements}) that fully_shard did not "
                    f"make: tensor parallelism (parallelize_module) is not supported; AdaFisher "
                    f"supports FSDP2 and DDP")
            _dim0_shard(p, name)                       # the placements
            size = p.device_mesh.size()
            for rank in range(size):
                start, length = _chunk_span(p.shape[0], size, rank)
                fisher.shard_meta(fisher.meta[id(p)], p.shape, start, length, name)

    def _hook(self) -> StatHooks:
        """NOTE: [hook lifetime] The model's hooks hold the optimizer only weakly, so an optimizer
        the user drops is freed, and then its finalizer removes its hooks.  Before, every
        optimizer ever made on a model stayed alive, with its momentum, and kept gathering
        statistics on every forward and backward (LR finders, sweeps, re-made optimizers)."""
        hooks = StatHooks(self.fisher, self._ops, weakref.WeakMethod(self._follow_model),
                          self._names)
        old = self.__dict__.get("_hooks_finalizer")
        if old is not None:         # hooks replaced by _relayout: the finalizer kept them alive
            old.detach()
        self._hooks_finalizer = weakref.finalize(self, hooks.remove)
        return hooks

    @_on_wrapped
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears gradients AND the raw statistics gathered since the last step (SPEC 3), but
        not the H of forwards whose backward runs after it, nor anything inside step(closure)
        (NOTE: [forward before zero_grad] in state.py)."""
        super().zero_grad(set_to_none)
        self._follow_model()
        if self._group_layout() != self._laid_out:
            self._adopt_groups()                # NOTE: [adopted groups]
        if self.fisher.in_closure:
            self.fisher.zero_grad_in_closure()
        else:
            if self._hooks.collecting:
                self.fisher.hold_h()            # NOTE: [compiled forward before zero_grad]
            self.fisher.clear(hold=True)

    def _reduce_stats(self, grad_scale: Optional[torch.Tensor]) -> None:
        """The output-gradient accumulators divided by loss scale ** degree (GradScaler
        multiplies the gradients, NOTE: [GradScaler]), one all-reduce of the flat buffer across
        ranks, then a division by world_size ** degree (DDP averages gradients, SPEC section 6).
        The loss scale is taken out before the sum, so that a rank that has joined (NOTE: [uneven
        inputs]) adds plain zeros."""
        fisher, world, group = self.fisher, self._world(), self._stat_group
        if grad_scale is not None:
            fisher.buf.mul_(torch.pow(grad_scale.to(fisher.buf), -fisher.grad_degree))
        if world > 1:
            torch_dist.all_reduce(fisher.buf, group=group)
            fisher.buf.mul_(torch.pow(torch.full((), world, dtype=fisher.buf.dtype,
                                                 device=fisher.buf.device), -fisher.grad_degree))

    def _world(self) -> int:
        """Ranks of the statistics group (NOTE: [statistics group]); 1 without one."""
        if self.dist or (torch_dist.is_available() and torch_dist.is_initialized()):
            return torch_dist.get_world_size(self._stat_group)
        return 1

    def _gather(self):
        """Lists for ``fused_step`` over the parameters that have a gradient (local shards of
        DTensors); raises on a bad gradient before any state changes."""
        fisher, free_lam, lam = self.fisher, PRESETS[self.preset].free_params_get_lambda, self.Lambda
        state, free, rows, dtensors = self.state, fisher.free, fisher.meta, dtensor_types()
        params, grads, moms, steps, meta, hyper = [], [], [], [], [], []
        for gi, group in enumerate(self.param_groups):
            if not all(k in group for k in _GROUP_KEYS):
                self._adopt_groups()        # NOTE: [adopted groups]
                return self._gather()
            lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
            # at every step: a schedule or a hand edit that makes a value invalid (NaN, lr < 0,
            # beta = 1) would poison the parameters or the momenta
            value = lr
            if isinstance(lr, torch.Tensor):                     # NOTE: [tensor lr]
                reference.check_lr(lr, fisher.buf.device, f"param_groups[{gi}]")
                # a CPU lr is read on the host at each step anyway, so its value is checked as a
                # float's; one on the device only where its group was made (reading it: a sync)
                value = lr.item() if lr.is_cpu and not torch.compiler.is_compiling() else 0.0
            _check_hparams(value, beta, 1.0, 1.0, 1, wd, f"param_groups[{gi}]: ")
            # one hyper row per Lambda: backends split each once.  Lambda is 0 for the
            # released code's factor-free parameters (F = 1)
            damped = (lr, beta, wd, lam)
            undamped = damped if free_lam else (lr, beta, wd, 0.0)
            for p in group["params"]:
                pid = id(p)
                row = rows.get(pid)
                if row is None:             # NOTE: [adopted groups]
                    self._adopt_groups()
                    return self._gather()
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError(f"parameter '{self._names.get(id(p), '?')}' has a sparse "
                                     f"gradient; AdaFisher needs dense gradients")
                st = state[p]
                if not st:
                    if p.device != fisher.buf.device:   # a model spread over devices
                        self._follow_model(f"parameter '{self._names.get(id(p), '?')}' is on "
                                           f"{p.device}")
                    st["step"] = torch.zeros((), dtype=torch.float32,
                                             device=p.device if self._device_steps else "cpu")
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = st["exp_avg"]
                if isinstance(p, dtensors):
                    name = self._names.get(id(p), "?")
                    start, length = _dim0_shard(p, name)
                    row = fisher.shard_meta(row, p.shape, start, length, name)
                    p, m, g = p.to_local(), m.to_local(), g.to_local()
                params.append(p)
                grads.append(g)
                moms.append(m)
                steps.append(st["step"])
                meta.append(row)
                hyper.append(undamped if pid in free else damped)
        if torch.compiler.is_compiling():  # a constant of the graph (torch 2.11 rejects the setattr)
            return params, grads, moms, steps, torch.tensor(meta, dtype=torch.int64), hyper
        if meta != self._meta[0]:          # the same rows every step unless grads come and go
            self._meta = (meta, torch.tensor(meta, dtype=torch.int64))
        return params, grads, moms, steps, self._meta[1], hyper

    def _pick_backend(self, device: torch.device) -> None:
        """The backend and ops for ``device`` (backends.resolve), and where step counts live.

        NOTE: [device steps] Like torch's fused Adam, the GPU kernels keep the step counts on the
        parameters' device even without capturable: incrementing 0-dim CPU tensors and uploading
        their values cost two host operations per parameter every step, and the CUDA backend's
        table, which carries host steps, could never stay cached.  The kernels' arithmetic is
        the same either way; the torch reference on its own keeps them on the CPU."""
        self.backend, self._ops = resolve(self._backend_request, device, self._check_ops)
        self._device_steps = self.capturable or (device.type == "cuda" and self.backend != "torch")

    def _follow_model(self, what: Optional[str] = None) -> None:
        """NOTE: [following the model] The curvature state is made where the parameters are, and
        a model moved afterwards (``accelerator.prepare`` moves the model after the optimizer was
        built; a model built on the meta device and then materialised) takes it along: the first
        forward hook, zero_grad(), step() or load_state_dict() that sees the parameters on another
        single device moves the curvature state and the momentum there, and backend="auto" picks
        the backend for that device again.  A model cast to or from float64 takes the state's
        dtype along (float64 where a parameter is, SPEC 3), and a model cast to any dtype its
        momentum to the parameters' dtypes, at the next zero_grad(), step() or load_state_dict()
        (the momentum is kept in the parameter's dtype).  A model spread over several devices
        is an error that says what to do; a move seen first by a hook in a compiled region is
        followed through a graph break (hooks._follow_eagerly), or, with fullgraph=True,
        an error that says what to do."""
        fisher = self.fisher
        seen = self._signature()
        if seen is None or (what is None and seen == self._seen):
            return
        params = [p for g in self.param_groups for p in g["params"]]
        dtype, dev = state_dtype(params), params[0].device
        moved = dev != fisher.buf.device
        devices = {p.device for p in params}
        if what is not None and not moved:
            self._check_replaced()
        # spread, compiling, or (with ``what``) the hooked layer ran elsewhere than the model
        if len(devices) > 1 or torch.compiler.is_compiling() or (what is not None and not moved):
            what = what or (f"the parameters are on {', '.join(sorted(str(d) for d in devices))} "
                            f"({str(dtype)[6:]} state)")
            raise RuntimeError(
                f"AdaFisher: {what}, but the optimizer's curvature state is on "
                f"{fisher.buf.device} ({str(fisher.buf.dtype)[6:]}). It follows a model moved "
                f"to one device at the next eager forward, zero_grad(), step() or "
                f"load_state_dict(), and one cast to another dtype at the next eager "
                f"zero_grad(), step() or load_state_dict() (NOTE: [following the model]), not "
                f"inside a compiled region: call one of them after moving the model, or build "
                f"the optimizer after model.to(device). Models spread over several devices are "
                f"not supported")
        if moved or dtype != fisher.buf.dtype:
            fisher.to(dev, dtype)
            self._pick_backend(dev)
            self._hooks.ops = self._ops
        for p in params:
            st = self.state.get(p)
            if st and st["exp_avg"].is_meta and dev.type != "meta":    # NOTE: [meta state]
                del self.state[p]
            elif st:
                st["exp_avg"] = st["exp_avg"].to(dev, p.dtype)
                st["step"] = st["step"].to(dev if self._device_steps else "cpu")
        self._note_dtypes(params)

    def _note_dtypes(self, params: List[torch.Tensor]) -> None:
        """Remembers the signature _follow_model compares with, and the float64 parameter (if
        any) it reads."""
        self._dtype_probe = next((p for p in params if p.dtype == torch.float64), None)
        self._seen = self._signature()

    def _signature(self):
        """What _follow_model compares per call: the first parameter's device and dtype, and the
        dtype of a float64 one while there is one.  One or two parameters, not all (0.7 us, not
        100, at 1000 parameters): a cast or move of the whole model changes them; one of a part
        after construction is not seen."""
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None:
            return None
        probe = first if self._dtype_probe is None else self._dtype_probe
        return first.device, first.dtype, probe.dtype

    def _stale_params(self) -> List[torch.Tensor]:
        """The parameters in param_groups that are no longer the model's (NOTE: [replaced])."""
        now = {id(p) for p in self._model.parameters()}
        return [p for g in self.param_groups for p in g["params"] if id(p) not in now]

    def _check_replaced(self) -> None:
        """Raises when parameters the optimizer holds are no longer the model's: fully_shard,
        to_empty() (without torch.__future__.set_swap_module_params_on_conversion(True)) and
        load_state_dict(assign=True) make new parameter objects, and the optimizer would go on
        gathering statistics for layers whose parameters it never steps."""
        if torch.compiler.is_compiling():
            return
        gone = [self._names.get(id(p), "?") for p in self._stale_params()]
        if gone:
            raise RuntimeError(
                f"AdaFisher: the model's parameter(s) {_listed(gone)} are not the ones the "
                f"optimizer was made with: fully_shard, to_empty() (unless torch.__future__."
                f"set_swap_module_params_on_conversion(True)) and load_state_dict(assign=True) make "
                f"new parameters. Make the optimizer after them (then load its checkpoint)")

    def _warn_unfrozen(self) -> None:
        """NOTE: [unfrozen] The optimizer trains the parameters that require gradients when it is
        made (and those add_param_group adds); torch's optimizers, given model.parameters(), hold
        frozen ones too and start training them once unfrozen.  A parameter frozen at
        construction that now has a gradient was unfrozen and is not trained, so statistics
        steps name it, once (a loop over the frozen parameters, not over the trained ones)."""
        got = [p for p in self._frozen if p.requires_grad and p.grad is not None]
        if not got:                      # (a still frozen one may keep an old .grad)
            return
        self._frozen = [p for p in self._frozen if not (p.requires_grad and p.grad is not None)]
        names = ", ".join(self._names.get(id(p), "?") for p in got)
        warn_user(f"AdaFisher: parameter(s) {names} were frozen when the optimizer was made "
                  f"and now have gradients, but the optimizer does not train them: add them "
                  f"with opt.add_param_group({{'params': [...]}}) (their layers then get "
                  f"curvature factors)")

    def _warn_replaced(self) -> None:
        """NOTE: [replaced] Parameters the optimizer holds that are no longer the model's: a module
        replaced after the optimizer was made (``model.fc = nn.Linear(...)``), or part of the model
        loaded with ``load_state_dict(..., strict=False, assign=True)``.  They get no gradient and
        are never stepped, and the model's new parameters are not trained; _check_replaced raises
        when no parameter has a gradient, this names a partial replacement, once per set.  Run at
        statistics steps when the number of parameters without a gradient changed: one pass over
        the model's parameters, not one per step."""
        gone = [p for p in self._stale_params() if id(p) not in self._replaced_named]
        if not gone:
            return
        self._replaced_named |= {id(p) for p in gone}
        new = [n for n, q in self._model.named_parameters()
               if q.requires_grad and id(q) not in self.fisher.meta]
        warn_user(f"AdaFisher: parameter(s) {_listed([self._names.get(id(p), '?') for p in gone])} "
                  f"that the optimizer trains are no longer the model's (a module replaced after "
                  f"the optimizer was made, e.g. model.fc = nn.Linear(...), or "
                  f"load_state_dict(assign=True) on part of the model): they are never stepped"
                  + (f", and the model's parameter(s) {_listed(new)} are not trained: add them "
                     f"with opt.add_param_group({{'params': [...]}}), or make the optimizer after "
                     f"changing the model" if new else ""))

    def _warn_silent_layers(self) -> None:
        """NOTE: [silent layers] A hooked layer whose parameters get gradients although the module
        itself was never called sees no statistics: nn.MultiheadAttention multiplies by
        ``out_proj.weight`` directly, never calling its ``out_proj`` Linear.  Nor does any layer
        of a model compiled and run before the optimizer was made: dynamo does not guard on
        hooks, so its graphs keep running without the optimizer's.  Such factors keep F = 1 +
        Lambda, which nothing else would reveal, so the first eager statistics step names such
        layers, once: those with gradients and no rows in the all-reduced row counts (one read;
        a layer another rank ran has rows).  The same counts show S rows without H rows, a
        forward before a compiled zero_grad() (NOTE: [compiled forward before zero_grad]): named
        too.  A layer that was called, but only with input its kind could not read (Layer.unread:
        a positional embedding whose forward takes a shape), is named with that cause; one called
        with an empty batch (Layer.empty) is not named: it was called.  Not with
        capturable=True, whose step() reads
        nothing from the device (the construction warning still names an nn.MultiheadAttention),
        nor on the meta device."""
        self._silent_checked = True
        fisher = self.fisher
        if self.capturable or fisher.buf.is_meta:
            return
        got = {fisher.owner[id(p)].name for g in self.param_groups for p in g["params"]
               if p.grad is not None and id(p) in fisher.owner}
        rows = fisher.buf[fisher.n_acc:].tolist()
        silent = [lay for lay in fisher.layers
                  if lay.name in got and not rows[lay.h_factor] and not rows[lay.s_factor]
                  and not lay.empty]
        unread = sorted(lay.name for lay in silent if lay.unread)
        silent = [lay.name for lay in silent if not lay.unread]
        if unread:
            warn_user(f"AdaFisher: layer(s) {', '.join(unread)} got gradients in a "
                      f"statistics iteration but gathered no curvature statistics, so their "
                      f"parameters step with F = 1 + Lambda: they were called, but with "
                      f"input their layer kind cannot read (an nn.Embedding subclass that "
                      f"does not look up the indices it is given, as a positional embedding "
                      f"whose forward takes a shape or a mask; NOTE: [silent layers])")
        if silent:
            warn_user(f"AdaFisher: layer(s) {', '.join(sorted(silent))} got gradients in a "
                      f"statistics iteration but gathered no curvature statistics, so their "
                      f"parameters step with F = 1 + Lambda.  Either the module was not "
                      f"called, its weight used directly: an nn.MultiheadAttention "
                      f"multiplies by out_proj.weight (adafisher_fast.expose_attention(model) "
                      f"makes it call its projections); timm's BEiT, EVA and SwinV2 attention "
                      f"calls F.linear on qkv.weight with separate q and v biases (set timm's "
                      f"qkv_bias_separate = True on those attention modules: qkv is then "
                      f"called, with the same result).  Or the "
                      f"model was compiled and run before the optimizer "
                      f"was made, and its graphs lack the optimizer's hooks: make the "
                      f"optimizer first, or call torch._dynamo.reset() after making it.  "
                      f"(A compiled nn.Embedding subclass whose lookups a construction "
                      f"warning could not check gathers nothing too; NOTE: [silent layers])")
        no_h = [lay.name for lay in fisher.layers if rows[lay.s_factor] and not rows[lay.h_factor]]
        if no_h:
            warn_user(f"AdaFisher: layer(s) {', '.join(sorted(no_h))} got output-gradient "
                      f"statistics but no activation statistics in a statistics iteration: "
                      f"zero_grad() ran between their forward and backward inside a compiled "
                      f"function, which drops the forward's (NOTE: [compiled forward before "
                      f"zero_grad]); call zero_grad() before the forward, or outside the "
                      f"compiled function, or use step(closure)")

    def _only_makes_state(self) -> bool:
        """NOTE: [DCP state step] torch.distributed.checkpoint's get/set_optimizer_state_dict
        make a fresh optimizer's state by a step with lr 0 and zero gradients.  Such a step
        can change nothing but the step count, and advancing that shifts the TCov schedule (the
        next TCov - 1 iterations gather nothing), so it only makes the state.  Checked on a
        fresh optimizer whose lrs are all 0 only (it reads the gradients, once); DCP sets a tensor
        lr to a CPU zero, and a tensor lr elsewhere is not read (NOTE: [capturable])."""
        lrs = [g["lr"] for g in self.param_groups]
        if self.state or self.fisher.forwarded or any(
                (not lr.is_cpu or bool(lr != 0)) if isinstance(lr, torch.Tensor) else lr != 0
                for lr in lrs):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return (bool(grads) and not self.fisher._pending_any and self.fisher.before is None
                and not bool(self.fisher.buf.any())
                and not any(bool(g.any()) for g in grads))

    @_on_wrapped
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if not torch.compiler.is_compiling():
            Join.notify_join_context(self)      # NOTE: [uneven inputs]
        self._follow_model()                    # (also DCP's lr-0 step after to_empty())
        if not torch.compiler.is_compiling() and self._group_layout() != self._laid_out:
            self._adopt_groups()                # NOTE: [adopted groups]
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            self.fisher.enter_closure()         # NOTE: [forward before zero_grad]
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self.fisher.exit_closure()
        if not torch.compiler.is_compiling() and self._only_makes_state():
            self._gather()
            return loss
        fisher = self.fisher
        grad_scale = getattr(self, "grad_scale", None)          # NOTE: [GradScaler]
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and ((self._hooks.collecting and self.TCov > 1)
                                      or not self._device_steps
                                      or found_inf.device != fisher.buf.device):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("AdaFisher.step: on a statistics iteration with TCov > 1 (or "
                                   "with step counts on the host) GradScaler's inf check reads "
                                   "found_inf on the host, which a CUDA graph cannot capture; "
                                   "capture a plain iteration, or train without a GradScaler "
                                   "(e.g. bf16 autocast) (NOTE: [GradScaler], [capturable])")
            if bool(found_inf):
                fisher.clear()
                if self._join_config.enable:    # a joined rank shadows it: NOTE: [uneven inputs]
                    self._shadow_step()
                return loss
            found_inf = None
        params, grads, moms, steps, meta, hyper = self._gather()
        fisher = self.fisher                    # laid out anew for adopted groups
        if not params and self._world() == 1:
            # NOTE: [no gradient] Not one gradient: a skipped batch (Lightning's training_step
            # returning None still calls step(closure), whose forward gathered H), or a step
            # before any backward.  torch's optimizers change nothing then; so this step folds
            # nothing into the curvature state and does not count (TCov keeps its phase).  With
            # a process group the step runs as usual: the other ranks' all-reduce needs this one.
            if self._hooks.collecting:
                self._check_replaced()          # statistics, and not one gradient: why?
            fisher.clear()
            return loss
        if grad_scale is not None and grads:
            # one launch; float32 arithmetic whatever the gradients' dtype, as GradScaler.unscale_
            # (a float16 copy of the default scale 2^16 is inf)
            inv = grad_scale.double().reciprocal().float()
            torch._foreach_mul_(grads, inv.to(grads[0].device))
        if self._hooks.collecting:
            if torch.compiler.is_compiling():           # NOTE: [host row counts]
                torch.ops.adafisher.flush_rows(fisher.buf, self._hooks.key)
            else:
                fisher.flush_rows()
            fisher.restore_h()          # NOTE: [compiled forward before zero_grad] in state.py
            self._reduce_stats(grad_scale)
            if not torch.compiler.is_compiling():
                if not self._silent_checked:
                    self._warn_silent_layers()
                if self._frozen:
                    self._warn_unfrozen()
                no_grad = len(fisher.meta) - len(params)
                if no_grad != self._no_grad:
                    self._no_grad = no_grad
                    self._warn_replaced()
            self._fold_statistics(found_inf)
        if params:
            self._ops.fused_step(params, grads, moms, steps, fisher.fac, meta, hyper, self.decoupled,
                                 found_inf)
        elif self._hooks.collecting and not torch.compiler.is_compiling():
            self._check_replaced()
        fisher.clear()
        self._hooks.set_steps(self.steps + 1, self.TCov, cleared=True)
        return loss

    # ------------------------------------------------------------------------------------------
    # NOTE: [uneven inputs] torch's Join context lets ranks run different numbers of iterations:
    # a rank out of batches shadows the collectives of the ranks still training.  step()'s one is
    # the statistics all-reduce (statistics iterations only), which a joined rank would otherwise
    # leave the others' to pair with DDP's next collective (gloo aborts, NCCL may mix buffers).
    # ``Join([ddp, opt])``: the joined rank's hook adds a zero buffer to that all-reduce, updates
    # its curvature state from the result as the others do (the gradient scale W^degree stays
    # the initial world's, as DDP's divide_by_initial_world_size), and counts the step, so TCov
    # gating stays in step on every rank after the context.  A step that GradScaler skips does
    # the same while Join is enabled (it cannot tell the joined rank it skipped): the all-reduce
    # of zeros (every layer skips that statistics iteration) and the step count.  Join runs one
    # round per DDP forward, so this needs one forward per step(): not no_sync() accumulation,
    # as for torch's ZeroRedundancyOptimizer.
    def join_hook(self, **kwargs) -> JoinHook:
        return _StepShadow(self)

    @property
    def join_device(self) -> torch.device:
        return self.fisher.buf.device

    @property
    def join_process_group(self):
        return self._stat_group if self._stat_group is not None else torch_dist.group.WORLD

    def _fold_statistics(self, found_inf: Optional[torch.Tensor] = None) -> None:
        """The layers' EMA of this statistics iteration (SPEC 2), one launch; none where
        ``found_inf`` is non-zero (NOTE: [GradScaler])."""
        f = self.fisher
        self._ops.layer_ema(f.buf, f.table, f.state, f.fac, f.initialized, f.counters,
                            PRESETS[self.preset].ema_rule(self.gamma), found_inf)

    def _shadow_step(self) -> None:
        """What step() does on the other ranks, for a rank that has joined: NOTE: [uneven inputs]."""
        fisher = self.fisher
        if self._hooks.collecting:
            fisher.clear()
            self._reduce_stats(None)
            self._fold_statistics()
            fisher.clear()
        self._hooks.set_steps(self.steps + 1, self.TCov, cleared=self._hooks.collecting)

    # ------------------------------------------------------------------------------------------
    # NOTE: [checkpoint layout] The curvature state (steps, EMA factors, H'/S', counters and the
    # layers' fingerprint) is the "adafisher" entry of the first param group, not a top-level
    # key: torch.distributed.checkpoint's get/set_optimizer_state_dict (FSDP2's checkpoints)
    # keep only "state" and "param_groups", and a top-level entry was dropped there.  Without
    # param groups it is top-level; checkpoints written that way load too.
    @_on_wrapped
    def state_dict(self) -> Dict[str, Any]:
        self._follow_model()            # a model materialised or moved since the last step
        self._adopt_groups()
        sd = super().state_dict()
        extra = {"steps": self.steps, "preset": self.preset, "gamma": self.gamma,
                 "TCov": self.TCov, "Lambda": self.Lambda, "layers": self.fisher.describe(),
                 **{k: v.clone() for k, v in self.fisher.tensors().items()}}
        if sd["param_groups"]:
            sd["param_groups"] = [{**sd["param_groups"][0], "adafisher": extra},
                                  *sd["param_groups"][1:]]
        else:
            sd["adafisher"] = extra
        return sd

    @_on_wrapped
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._follow_model()
        self._adopt_groups()
        sd = dict(state_dict)
        groups = [dict(g) for g in sd.get("param_groups", ())]
        extra = sd.pop("adafisher", None)
        if groups and "adafisher" in groups[0]:          # NOTE: [checkpoint layout]
            extra = groups[0].pop("adafisher")
            sd["param_groups"] = groups
        if extra is None:
            raise ValueError("state_dict: not an AdaFisher checkpoint (it has no 'adafisher' entry; "
                             "torch.distributed.checkpoint keeps it with its default options, not "
                             "with flatten_optimizer_state_dict=True)")
        if extra["preset"] != self.preset:
            raise ValueError(f"state_dict: checkpoint has preset={extra['preset']!r}, this optimizer "
                             f"preset={self.preset!r}")
        mine, theirs = self.fisher.describe(), extra["layers"]
        for a, b in zip(mine, theirs):
            if a != b:
                raise ValueError(f"state_dict: layer '{a['name']}' ({a['kind']}, H {a['h_size']}, "
                                 f"S {a['s_size']}) does not match the checkpoint's layer "
                                 f"'{b['name']}' ({b['kind']}, H {b['h_size']}, S {b['s_size']})")
        if len(mine) != len(theirs):
            raise ValueError(f"state_dict: the checkpoint has {len(theirs)} hooked layers, this "
                             f"model {len(mine)}")
        self._check_state_shapes(sd)
        _check_hparams(**{**_PASSING, **{k: extra[k] for k in ("Lambda", "gamma", "TCov")}},
                       where="state_dict: ")
        # the groups keep this optimizer's capturable flag, and the loaded step counts go where
        # this optimizer keeps them (NOTE: [device steps])
        sd["param_groups"] = [{**g, "capturable": self.capturable} for g in sd["param_groups"]]
        super().load_state_dict(sd)
        for p in (p for g in self.param_groups for p in g["params"]):
            st = self.state.get(p)
            if st and "step" in st:
                st["step"] = st["step"].to(p.device if self._device_steps else "cpu",
                                           torch.float32)
        for k, v in self.fisher.tensors().items():
            v.copy_(extra[k])
        self.gamma, self.TCov, self.Lambda = extra["gamma"], extra["TCov"], extra["Lambda"]
        self._hooks.set_steps(extra["steps"], self.TCov)

    def _check_state_shapes(self, sd: Dict[str, Any]) -> None:
        """A momentum of another shape than its parameter (a resized vocabulary, a factor-free
        parameter, a conv kernel of the same size): refused before anything loads, as torch's
        own load_state_dict pairs state with parameters by position and checks no shape."""
        sizes = [len(g["params"]) for g in sd.get("param_groups", ())]
        if sizes != [len(g["params"]) for g in self.param_groups]:
            return                      # torch's load_state_dict names the group sizes
        saved = [i for g in sd["param_groups"] for i in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved, mine):
            m = sd.get("state", {}).get(i, {}).get("exp_avg")
            if m is not None and m.shape != p.shape:
                raise ValueError(f"state_dict: the checkpoint's momentum of parameter "
                                 f"'{self._names.get(id(p), '?')}' has shape {tuple(m.shape)}, "
                                 f"the parameter {tuple(p.shape)}")

    # ------------------------------------------------------------------------------------------
    @_on_wrapped
    def raw_stats(self) -> Dict[str, tuple]:
        """{module name ("<root>" for the model itself, as in every report): (H, S)}: the raw
        statistics gathered since the last step/zero_grad, finalised as SPEC section 2 defines
        them (before any EMA or normalisation), with the H that zero_grad() held for the step
        (NOTE: [compiled forward before zero_grad]).  A factor that gathered no rows (no forward
        or no backward yet) is NaN: a mean over nothing, which the step leaves out of the EMA.
        Under DDP/FSDP2 they are this rank's, before the step's all-reduce and gradient scale
        (NOTE: [statistics group])."""
        from .reference import layer_raw
        self._follow_model()
        self.fisher.flush_rows()
        raw = layer_raw(self.fisher.with_held_h(), self.fisher.table)
        return {l.label: (raw[l.h_raw].clone(), raw[l.s_raw].clone()) for l in self.fisher.layers}

    @_on_wrapped
    def ema_state(self) -> Dict[str, tuple]:
        """{module name: (H state, S state)}: the EMA vectors of every hooked layer."""
        self._follow_model()
        st = self.fisher.state
        return {l.label: (st[l.h_raw].clone(), st[l.s_raw].clone()) for l in self.fisher.layers}

    @_on_wrapped
    def curvature_report(self) -> List[dict]:
        """One flat dict per hooked layer: H', S' and F statistics and the curvature share
        (``adafisher_fast.report``; render with ``adafisher_fast.format_report``)."""
        self._follow_model()
        return curvature_report(self)

    @_on_wrapped
    def diagnostics(self) -> Dict[str, Dict[str, int]]:
        """{module name: {"stat_iters": n, "nonfinite_skips": k}}: statistics iterations that
        updated the layer, and those it skipped because its raw statistics were not finite (its
        state was kept)."""
        self._follow_model()
        return {l.label: {"stat_iters": it, "nonfinite_skips": sk}
                for l, (it, sk) in zip(self.fisher.layers, self.fisher.counters.tolist())}


class _StepShadow(JoinHook):
    def __init__(self, opt: AdaFisher):
        self.opt = opt

    def main_hook(self) -> None:
        self.opt._shadow_step()

    def post_hook(self, is_last_joiner: bool) -> None:
        # torch leaves a joinable's config enabled after the context: a step GradScaler skips
        # later must be skipped, not shadowed (NOTE: [uneven inputs])
        self.opt._join_config = self.opt._join_config._replace(enable=False)


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay: p <- p - lr * (m_hat / F + weight_decay * p)."""
    decoupled = True
