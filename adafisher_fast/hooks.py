"""Statistics hooks (SPEC section 3): a forward hook reads the module input and registers a tensor
hook on the module output for the output gradient (for a layer with submodules of its own, on the
input of the first submodule its forward calls: NOTE: [composite layers] in state.py).  Never a
full backward hook: a tensor hook registered before an in-place op (``ReLU(inplace=True)``,
``out += residual``) still receives the gradient of the module's own output (a view output's
hook goes on its base: NOTE: [view outputs]), so such models work unchanged.

The hooks only add into the flat buffer in ``FisherState``; all accumulation semantics (micro-batches,
modules called several times) follow from that.
"""
from __future__ import annotations

import inspect
import itertools
import numbers
import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
from torch.autograd.graph import get_gradient_edge

from .custom_ops import CompileAwareOps, define_op
from .layers import call_result, submodules
from .state import FisherState, Layer

class _GradTap(torch.autograd.Function):
    """NOTE: [grad tap] While compiling, the forward hook returns the output through this
    instead of registering a tensor hook on it: a copy of the output whose backward passes the
    gradient through after handing it to the statistics hook.  A tensor hook on an intermediate
    tensor does not compile well on any torch we support.  torch 2.11's dynamo rewrites it into
    an autograd.Function that returns a view, so an in-place op after the module
    (``ReLU(inplace=True)``) is rejected, and moves the placeholder of a tensor the hook closes
    over (our statistics buffer) behind its first use ("referenced nonexistent value").  torch
    2.13 traces it as a higher-order op, but on Hugging Face's GPT-2 and LLaMA (transformers
    5.24.0) dynamo then fails whole frames and runs them eagerly: 10 and 11 graphs, where the
    models under AdamW compile to 2 and 1, as they do with this function.  Inductor removes the
    copy as a no-op clone (the same kernels as with the tensor hook, checked on a small MLP);
    under other backends it costs one write of the output on statistics iterations (NOTE: [TCov
    gating]).  Eager mode keeps the tensor hook, which copies nothing."""

    @staticmethod
    def forward(ctx, output, hook):
        ctx.hook = hook
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.hook(grad)
        return grad, None


def _register_grad_hook(t: torch.Tensor, hook) -> None:
    """NOTE: [view outputs] ``hook(gradient of t)``, also when t is modified in place later.  A
    tensor hook stays with the autograd node that made the tensor, and an in-place op after
    it (``ReLU(inplace=True)``, ``out += residual``) chains that node into the graph, unless the
    tensor is a view: an in-place op on a view rewrites its base's history and drops the view's
    node, with its hook.  Linear returns a view on 1-D and 3-D+ inputs (its matmul's result,
    reshaped), a convolution on unbatched input, so their S was lost.  A view that is its whole
    base reshaped has the base's gradient reshaped, so the hook goes on the base: for a layer's
    output that base is the layer's own result, which nothing else uses.  Other views keep a
    hook of their own, and so does the input of a composite layer's first submodule (NOTE:
    [composite layers]), whose base may be used elsewhere."""
    base = t._base
    if (base is not None and base.numel() == t.numel() and t.is_contiguous() and base.is_contiguous()
            and t.storage_offset() == base.storage_offset()):
        shape = t.shape
        _tensor_hook(base, lambda grad: hook(grad.reshape(shape)))
    else:
        _tensor_hook(t, hook)


def _tensor_hook(t: torch.Tensor, hook) -> None:
    """``t.register_hook(hook)`` without the RemovableHandle that nobody removes (the hook goes
    with t and its node).  On a plain tensor made by an op and without hooks yet, register_hook
    gives t a hook dict, registers that dict with t's node, makes a handle and adds the hook under
    the handle's id; here the dict is made with the hook in it, under a key no handle has: the
    same C++ hook, run (and traced by compiled autograd) the same way, in a third of the time
    (1.3 us a call against 4.2, warm, on the 2-core CI host).  Anything else (a tensor subclass,
    a leaf, a tensor that has hooks) takes register_hook."""
    node = t.grad_fn
    if type(t) is not torch.Tensor or node is None or t._backward_hooks is not None:
        t.register_hook(hook)
        return
    t._backward_hooks = OrderedDict(((_HOOK_KEY, hook),))     # (a user's handle weakrefs it)
    node._register_hook_dict(t)


_HOOK_KEY = "adafisher"     # (a handle's id is an int)


def _first_param(module: torch.nn.Module) -> Optional[str]:
    """The name of forward's first parameter: the module's input also when passed by keyword
    (``linear(input=x)``, ``rmsnorm(x=h)``)."""
    try:
        return next(iter(inspect.signature(module.forward).parameters), None)
    except (TypeError, ValueError):     # a forward replaced by something without a signature
        return None


def _inert(*args) -> None:
    """The hook function of a copy of a hooked model (``_ModelHook``): does nothing (whatever
    the hook's signature: a model saved before hooks took kwargs passes three arguments)."""


class _ModelHook:
    """The forward hook a hooked module holds.  NOTE: [model copies] A copy of the model is not
    the optimizer's model: ``copy.deepcopy(model)`` (EMA and SWA copies, e.g.
    ``torch.optim.swa_utils.AveragedModel``) and ``torch.save(model)`` take this with ``_inert``
    as its function, so a copy's forward passes add nothing to the optimizer's statistics, and
    saving a whole model works (a closure fails it: "Can't pickle local object")."""
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):          # (module, inputs, kwargs, output)
        return self.fn(*args)

    def __reduce__(self):
        return _ModelHook, (_inert,)


def _eager_outside_compiled_code(code) -> None:
    """NOTE: [hooks outside compiled code] A compiled forward inlines the hooks into its graph.
    A hook that runs outside one while dynamo is active would compile as a frame of its own:
    ``nn.Sequential(...).compile()`` compiles no frame of torch's own modules (torch.compile's
    skip rules), only the Python they call, i.e. our hooks, once per layer (a guard on the
    layer), until dynamo's recompile limit (8) stopped it with a warning pointing at this file
    (a 12-layer Sequential: 10 graphs and 4 s of compiling, 2026-12-06, torch 2.13).  So when
    dynamo meets ``code`` as a frame of its own, it runs it and what it calls eagerly, as a
    model that is not compiled runs them; inlining is unaffected.  (A private torch API, present
    in torch 2.11 to 2.14; where it is missing or has changed, as before, and the package still
    imports.)"""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy
        from torch._dynamo.eval_frame import set_code_exec_strategy
        set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
    except (ImportError, AttributeError, TypeError):
        pass


def _follow(hooks: "StatHooks", what: str) -> None:
    """Moves the optimizer's state to where a hooked layer ran (NOTE: [following the model])."""
    follow = hooks.follow()
    if follow is not None:
        follow(what)


_follow_eagerly = _follow      # compile-disabled by _compile_support


def _compile_support() -> None:
    """NOTE: [lazy imports] What compiled models need from torch._dynamo, made once, at the first
    StatHooks, not when the package is imported: importing torch._dynamo (and
    torch.distributed.tensor, for DTensor checks: ``layers.dtensor_types``) took
    ``import adafisher_fast`` from torch's own 0.9 s to 2.1 s (2026-12-06, torch 2.13, the
    2-core CI host), which every process that imports it (a spawned DataLoader worker that
    re-imports the training script) paid.  ``_follow_eagerly`` becomes a graph break under
    compile, so that the eager call can move the state."""
    global _follow_eagerly
    if _follow_eagerly is _follow:
        _eager_outside_compiled_code(_ModelHook.__call__.__code__)
        _follow_eagerly = torch.compiler.disable(_follow, reason=(
            "AdaFisher: the model was moved after the optimizer was made, and the move is first "
            "seen inside a compiled region; the optimizer's state follows it eagerly (a graph "
            "break). With fullgraph=True, call opt.zero_grad() after moving the model "
            "(NOTE: [following the model])"))


# NOTE: [backward statistics] A compiled graph's backward cannot add into the statistics buffer
# as traced code: AOT autograd makes a mutation of a forward input functional, so the backward
# would write "the buffer as this graph's forward left it, plus its statistics" back into it,
# dropping what any other graph added in between (the graph past a graph break, the same graph
# called again before one backward; torch stops it with "modified by an inplace operation").
# So under compile the output-gradient hook is this one opaque op, marked side-effecting so that
# nothing removes it, which runs the eager hook body on the live buffer when the backward runs.
# The forward hook's statistics stay traced code: a graph's forward runs whole, so its
# functional update of the buffer is exact, and inductor fuses it into the model's kernels.
_LIVE: "weakref.WeakValueDictionary[int, StatHooks]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()
_KEYS_OF_LAYOUT: dict = {}


def _key(fisher: FisherState) -> int:
    """NOTE: [hook keys] The key by which compiled graphs find the live hooks (``_LIVE``).  It is
    a constant of the graphs, with the layers' indices and buffer ranges, and dynamo guards on
    it: a fresh key for every optimizer recompiled the model for each one re-made (LR finder then
    training, a sweep), and from the 9th on dynamo's recompile limit ran it uncompiled.  So a key
    no live hooks hold is reused for the same layout, whose graphs send every statistic where
    this optimizer's layout expects it; another layout takes a new key."""
    layout = (fisher.n_acc, getattr(fisher.preset, "name", fisher.preset), tuple(
        (lay.name, type(lay.kind).__name__, lay.h_acc.start, lay.h_acc.stop, lay.s_acc.start,
         lay.s_acc.stop, lay.h_factor, lay.s_factor, len(lay.aliases)) for lay in fisher.layers))
    keys = _KEYS_OF_LAYOUT.setdefault(layout, [])
    key = next((k for k in keys if k not in _LIVE), None)
    if key is None:
        key = next(_KEYS)
        keys.append(key)
    return key


def _shares(t: torch.Tensor, other: torch.Tensor, copies: bool = False) -> bool:
    """Whether t is a view of other's memory (``copies``: or of a copy of all of it)."""
    if t.device != other.device or t.dtype != other.dtype:
        return False
    mine, theirs = t.untyped_storage(), other.untyped_storage()
    return mine.data_ptr() == theirs.data_ptr() or (copies and mine.nbytes() == theirs.nbytes())


def describe(t: torch.Tensor, entry: Optional[int] = None) -> Optional[str]:
    """NOTE: [check names] What ``t``, a tensor an op wrote, is to a live optimizer, for
    check=True's errors (check.py), which find a disagreement where only the op's arguments are
    at hand: a statistics op's ``out`` names the layer and factor its offset in the flat buffer
    falls in; an entry of the curvature state (``entry``: the flat index of the worst error) its
    layer and factor; a parameter its name.  Found by memory, at the error only.  In a compiled
    forward the statistics ops write a functional copy of the whole buffer (seen with
    aot_eager), which has the buffer's size and t's offset in it: looked for when nothing holds
    t's own memory.  None when nothing does (an op called by hand)."""
    live = list(_LIVE.values())
    for copies in (False, True):
        for hooks in live:
            found = _describe_in(hooks, t, entry, copies)
            if found is not None:
                return found
    return None


def _describe_in(hooks: "StatHooks", t: torch.Tensor, entry: Optional[int],
                 copies: bool) -> Optional[str]:
    f = hooks.fisher

    def layer(lay: Layer, what: str) -> str:
        return f"layer '{lay.label}' ({type(lay.module).__name__}), {what}"

    if _shares(t, f.buf, copies):
        at = t.storage_offset() - f.buf.storage_offset()
        return next((layer(lay, f"{w} statistics") for lay in f.layers
                     for w, acc in (("H", lay.h_acc), ("S", lay.s_acc))
                     if acc.start <= at < acc.stop), None)
    if copies:
        return None
    if entry is not None:
        if _shares(t, f.state) or _shares(t, f.fac):    # (fac's last entry: the constant 1)
            return next((layer(lay, f"{w} factor") for lay in f.layers
                         for w, raw in (("H", lay.h_raw), ("S", lay.s_raw))
                         if raw.start <= entry < raw.stop), None)
        if _shares(t, f.initialized):
            return next((layer(lay, f"{w} factor") for lay in f.layers
                         for w, k in (("H", lay.h_factor), ("S", lay.s_factor)) if k == entry),
                        None)
        if _shares(t, f.counters) and entry // 2 < len(f.layers):
            return layer(f.layers[entry // 2], "counters")
    name = hooks.names.get(id(t))
    return None if name is None else f"parameter '{name}'"


def _output_grad_stats(grad: torch.Tensor, hooks: int, layer: int, module: int,
                       generation: Optional[torch.Tensor], recomputed: Sequence[torch.Tensor],
                       recomputed_at: Sequence[int]) -> None:
    """``module``: which of the layer's ``modules`` was called; ``generation``: None from a
    compiled model, the call's forward generation from an eager model's hook that compiled
    autograd traced (NOTE: [compiled autograd]); ``recomputed``: the H inputs of that hook's
    recomputed calls, of ``modules[recomputed_at[i]]`` (NOTE: [recomputation])."""
    owner = _LIVE.get(hooks)
    if owner is not None:                   # (else the optimizer is gone)
        owner._backward_stats(owner.fisher.layers[layer], module, grad,
                              None if generation is None else int(generation),
                              zip(recomputed_at, recomputed))


define_op("adafisher::output_grad_stats", (), _output_grad_stats)    # NOTE: [op dispatch]
torch.fx.node.has_side_effect(torch.ops.adafisher.output_grad_stats.default)


def _flush_rows(buf: torch.Tensor, hooks: int) -> None:
    """A compiled step()'s ``FisherState.flush_rows``: the row counts that eager hooks left on
    the host (a forward without a backward, or compiled autograd's backward) reach ``buf``
    before the step reads it (NOTE: [host row counts])."""
    owner = _LIVE.get(hooks)
    if owner is not None:
        owner.fisher.flush_rows(buf)


define_op("adafisher::flush_rows", ("buf",), _flush_rows)


# NOTE: [DataParallel] nn.DataParallel copies the model to every GPU at each forward and runs
# the copies in threads, each on its slice of the batch; its replicas call the layers' hooks with
# activations on their own GPUs, which the statistics buffer is not on.  Gathering them would
# need a cross-device reduction per layer call, and one GPU is all our GPU tests have, so it is
# refused by name (at construction when the wrapper spans devices; Hugging Face's Trainer wraps
# the model itself when one process sees several GPUs, so a replica's first statistics call
# raises too) rather than with "ran on cuda:1".
_DATA_PARALLEL = ("AdaFisher: {}: DataParallel runs a copy of the model per GPU in threads, "
                  "whose statistics cannot be gathered; use DistributedDataParallel, one process "
                  "per GPU (torchrun; Hugging Face's Trainer and accelerate use it when launched "
                  "with torchrun or `accelerate launch`), or one GPU (CUDA_VISIBLE_DEVICES=0) "
                  "(NOTE: [DataParallel] in hooks.py)")


class _Tap:
    """One composite layer's current call (NOTE: [composite layers]): armed by the layer's forward
    pre-hook, ``placed`` by the first submodule call with the output-gradient hook's pending list
    (or True), cleared by the layer's forward hook."""
    __slots__ = ("armed", "x", "placed")

    def __init__(self):
        self.armed, self.x, self.placed = False, None, None


def _transformed(compiling: bool, *values) -> bool:
    """Whether a call runs inside a torch.func transform (grad, vmap, jacrev, ...): its tensors
    are functorch wrappers, and the gradients it computes never reach ``.grad``, so the step
    does not use them and the call gathers nothing (adding wrappers into the buffer in place
    raised).  Not checked while ``compiling``: dynamo traces transforms itself, on fake tensors."""
    if compiling:
        return False
    for v in values:        # (a loop: a generator cost a microsecond of every hook call)
        if isinstance(v, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(v):
            return True
    return False


def _params(module: torch.nn.Module, names) -> List[torch.Tensor]:
    """``getattr(module, name)`` for each name: a registered parameter straight from
    ``_parameters`` (``Module.__getattr__`` cost 1.4 us a name on every statistics call), anything
    else (a parametrized weight's property) by getattr."""
    own = module._parameters
    return [own[n] if n in own else getattr(module, n) for n in names]


def _computes_grad(params: List[torch.Tensor], nodes: dict) -> bool:
    """NOTE: [gradient passes] Statistics follow the gradients (SPEC 3): an output gradient counts
    when its backward pass computes the gradient of one of the layer's parameters (``params``, as
    the call that made the output used them).  ``torch.autograd.grad(D(x).sum(), x,
    create_graph=True)`` (WGAN-GP's and R1's penalties, a PINN's input derivatives) and
    ``backward(inputs=...)`` without the layer's parameters also run the layer's gradient hooks,
    with gradients of something other than the loss that never reach ``.grad``: they add
    nothing.  ``autograd.grad(loss, params)`` does compute them (a loop that sets ``.grad`` by
    hand).  Parameters that do not require gradients (a layer frozen after construction) decide
    nothing, and a pass the engine cannot tell about counts, as before.  Eager calls only: a
    compiled backward runs its hook op below autograd, where a parameter's gradient node cannot
    be looked up, so a compiled model still counts such passes (so does compiled autograd: NOTE:
    [compiled autograd]).  A parameter's gradient node (its AccumulateGrad) is looked up once
    and kept in ``nodes``: the lookup costs a view, 7 us per layer and statistics iteration.
    torch reuses a node that is kept, as DDP's reducer relies on, until the parameter's dtype
    or device changes (``p.data = ...`` in ``model.to()``), which the cache key follows."""
    asked = False
    for p in params:
        if p.requires_grad:
            if p.grad_fn is not None:       # a weight computed in the forward (parametrized)
                node = p.grad_fn
            else:
                hit = nodes.get(id(p))
                if hit is None or hit[0] is not p or hit[1] != (p.dtype, p.device):
                    if len(nodes) > 4096:   # parameters replaced again and again
                        nodes.clear()
                    hit = nodes[id(p)] = (p, (p.dtype, p.device), get_gradient_edge(p).node)
                node = hit[2]
            try:
                if torch._C._will_engine_execute_node(node):
                    return True
            except RuntimeError:        # p is an input of autograd.grad, or no engine runs
                return True
            asked = True
    return not asked


class _EagerNoGrad:
    """``torch.no_grad()`` through the grad mode's C binding: 0.2 us a use against no_grad's
    1.2 us (its decorator machinery), twice per hooked layer and statistics iteration."""
    __slots__ = ("prev",)

    def __enter__(self):
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc):
        torch._C._set_grad_enabled(self.prev)


def _no_grad(compiling: bool):
    """The hook bodies' no-grad context: ``torch.no_grad()`` while compiling (dynamo traces
    it), else ``_EagerNoGrad``."""
    return torch.no_grad() if compiling else _EagerNoGrad()


def _rows(lay: Layer, method: str, rows):
    """``rows``, the row count a layer kind's h_stats/s_stats returned, if it is one (an int, a
    SymInt while tracing, or a tensor); a kind that forgot to return it, or returned a negative
    int, is named."""
    if type(rows) is int and rows >= 0:     # the common case, first: this runs on every call
        return rows
    if isinstance(rows, bool) or not isinstance(rows, (numbers.Integral, torch.SymInt,
                                                       torch.Tensor)):
        raise TypeError(f"AdaFisher: {type(lay.kind).__name__}.{method} of '{lay.label}' returned "
                        f"{rows!r}: it must return the number of rows it added (an int)")
    if isinstance(rows, numbers.Integral) and rows < 0:     # (a SymInt or tensor: not read)
        raise ValueError(f"AdaFisher: {type(lay.kind).__name__}.{method} of '{lay.label}' "
                         f"returned {rows} rows: a count is >= 0")
    return rows


class StatHooks:
    def __init__(self, fisher: FisherState, ops, follow, names: dict):
        _compile_support()
        self.key = _key(fisher)                 # NOTE: [backward statistics], [hook keys]
        _LIVE[self.key] = self
        self.fisher = fisher
        self.ops = ops                  # the backend's statistics ops (backends.py)
        self.names = names              # id(parameter) -> name, the optimizer's (NOTE: [check names])
        self._grad_nodes: dict = {}     # NOTE: [gradient passes]
        # follow(): the optimizer's method (or None once it is gone: NOTE: [hook lifetime]) that
        # moves its state to where the model now is, or raises (NOTE: [following the model])
        self.follow = follow
        # NOTE: [TCov gating] Whether an iteration gathers statistics is the Python bool
        # ``collecting`` (steps % TCov == 0), read by the forward hook.  torch.compile inlines the
        # hooks and guards on that bool, so a compiled model has exactly two graphs, with
        # statistics (hook ops and grad taps, NOTE: [grad tap]) and without, and switches between
        # them by guard without recompiling (tests/test_compile.py counts them).  A tensor flag
        # would keep one graph but make every iteration pay for masked statistics, or need
        # data-dependent control flow (a graph break).  The counter lives here, not on the
        # optimizer, because dynamo drops int attribute writes on torch.optim.Optimizer objects
        # inside a compiled step() (seen on torch 2.13), which would freeze the gating.
        self.steps = 0
        self.collecting = True
        self.handles: List[torch.utils.hooks.RemovableHandle] = []
        for lay in fisher.layers:
            first, children = _first_param(lay.module), [c for _, c in submodules(lay.module)]
            tap = _Tap() if children else None
            # prepended: a user's forward hook that replaces the output must not change what
            # the statistics see (the module's own output and its gradient)
            self.handles += [m.register_forward_hook(
                _ModelHook(self._forward_hook(lay, which, first, tap)), with_kwargs=True,
                prepend=True) for which, m in enumerate(lay.modules)]   # NOTE: [shared parameters]
            if tap is not None:
                self.handles.append(lay.module.register_forward_pre_hook(
                    _ModelHook(self._arm_hook(first, tap)), with_kwargs=True))
                self.handles += [c.register_forward_pre_hook(
                    _ModelHook(self._submodule_hook(lay, tap)), with_kwargs=True)
                    for c in children]

    def _arm_hook(self, first: Optional[str], tap: _Tap):
        def hook(module, inputs, kwargs):
            x, compiling = inputs[0] if inputs else kwargs.get(first), torch.compiler.is_compiling()
            tap.armed = (torch.is_grad_enabled() and self.collecting
                         and not _transformed(compiling, x))
            # eagerly x's id, not x: a forward that raises before the layer's forward hook
            # clears the tap would keep x, and the autograd graph behind it, alive
            tap.x = (x if compiling else id(x)) if tap.armed else None
        return hook

    def _submodule_hook(self, lay: Layer, tap: _Tap):
        """The pre-hook of a composite layer's submodules: the first one its forward calls gets
        the output-gradient hook on its input, unless that is the layer's own input (NOTE:
        [composite layers] in state.py)."""
        def hook(child, inputs, kwargs):
            if not tap.armed:
                return None
            tap.armed = False
            t, compiling = inputs[0] if inputs else None, torch.compiler.is_compiling()
            own = t is tap.x if compiling else id(t) == tap.x
            if not isinstance(t, torch.Tensor) or own or not t.requires_grad:
                return None
            if compiling:
                tap.placed = True
                tapped = _GradTap.apply(t, self._grad_hook(lay, 0, True))    # NOTE: [grad tap]
                return (tapped,) + inputs[1:], kwargs
            tap.placed = []          # the parent's hook adds a recomputed call's input here
            _tensor_hook(t, self._grad_hook(lay, 0, False, tap.placed))
            return None
        return hook

    def _forward_hook(self, lay: Layer, which: int, first: Optional[str], tap: Optional[_Tap]):
        """The forward hook of ``lay.modules[which]``."""
        fisher = self.fisher

        def hook(module, inputs, kwargs, output):
            placed = None
            if tap is not None:
                placed, tap.placed, tap.armed, tap.x = tap.placed, None, False, None
            # grad mode first: a compiled no-grad forward (an evaluation) then does not read,
            # and guard on, the TCov gating: one graph for both kinds of iteration
            if not (torch.is_grad_enabled() and self.collecting):
                return
            x, compiling = inputs[0] if inputs else kwargs.get(first), torch.compiler.is_compiling()
            result = call_result(output)
            if _transformed(compiling, x, result):
                return
            if not compiling and module.__dict__.get("_is_replica"):       # (no __getattr__)
                raise RuntimeError(_DATA_PARALLEL.format(f"layer '{lay.name}' ran as an "
                                                         f"nn.DataParallel replica"))
            if isinstance(x, torch.Tensor):
                if not compiling:
                    fisher.note_forward()        # NOTE: [forward before zero_grad]
                if x.device != fisher.buf.device:
                    _follow_eagerly(self, f"layer '{lay.name}' ran on {x.device}")
                x = lay.kind.h_input(module, x.detach(), result)
            if not isinstance(x, torch.Tensor):  # a call the kind cannot read: gather nothing
                if not compiling:                # (while compiling, reading lay would guard on it)
                    lay.unread = True            # NOTE: [silent layers]
                return
            if not compiling and not x.numel():
                lay.empty = True                 # NOTE: [silent layers]
            # NOTE: [recomputation] A forward inside a backward pass is activation checkpointing
            # recomputing a segment.  Non-reentrant checkpointing (torch.utils.checkpoint's
            # use_reentrant=False) already ran this call in the forward pass, and the recomputed
            # output gets no gradient; reentrant checkpointing ran the forward pass without grad,
            # and its recomputed output does get the gradient.  So such a call's H statistics
            # are added by its output-gradient hook, if the gradient arrives: once in both
            # modes (the released code's per-call statistics, official LayerNorm, counted a
            # recomputed call twice).  Compiled models recompute in the graph, not through hooks.
            recompute = not compiling and torch._C._current_graph_task_id() != -1
            if not recompute:
                self._h_stats(lay, module, x, compiling)
            if placed is not None:               # on a submodule's input (composite layers)
                if recompute:
                    placed.append((which, x))
            elif isinstance(result, torch.Tensor) and result.requires_grad:
                if compiling:   # NOTE: [grad tap]
                    tapped = _GradTap.apply(result, self._grad_hook(lay, which, True))
                    return tapped if result is output else type(output)((tapped, *output[1:]))
                _register_grad_hook(result, self._grad_hook(lay, which, False,
                                                            [(which, x)] if recompute else None))

        return hook

    def _stats_ops(self, compiling: bool):
        """The ops the layer kinds call: eagerly the backend's own, not through CompileAwareOps,
        whose compile check cost 1.5 us a call (two or three calls per hooked layer)."""
        ops = self.ops
        return ops._ops if not compiling and type(ops) is CompileAwareOps else ops

    def _h_stats(self, lay: Layer, module, x: torch.Tensor, compiling: bool) -> None:
        """``compiling``: torch.compile traces this call, else it runs eagerly."""
        fisher = self.fisher
        with _no_grad(compiling):
            acc = fisher.acc(lay.h_factor, lay.h_acc, compiling)
            rows = lay.kind.h_stats(module, x, acc, fisher.preset, self._stats_ops(compiling))
            fisher.add_rows(lay.h_factor, _rows(lay, "h_stats", rows), compiling)

    def _grad_hook(self, lay: Layer, which: int, compiling: bool,
                   recomputed: Optional[list] = None):
        """The output-gradient hook of a call of ``lay.modules[which]`` (the layer's module or an
        alias, NOTE: [shared parameters]); ``recomputed``: [(which, input)] of a recomputed call
        whose H statistics wait for this gradient (NOTE: [recomputation]), or None.  While
        ``compiling``, the hook is one opaque op (NOTE: [backward statistics])."""
        if compiling:
            key, index = self.key, self.fisher.layers.index(lay)

            def compiled_hook(grad):
                torch.ops.adafisher.output_grad_stats(grad, key, index, which, None, [], [])
            return compiled_hook

        fisher = self.fisher
        generation, generation_t = fisher.generation, fisher.generation_tensor()
        module = lay.module_at(which)
        params = _params(module, lay.pnames)

        # NOTE: [compiled autograd] Compiled autograd traces an eager model's gradient hooks into
        # its backward graph.  Traced as they run eagerly, they broke that graph at the engine
        # query of _computes_grad, and dynamo then compiled each hook, _computes_grad and the
        # resume function as frames of their own, again for each layer (guards on the closure's
        # parameters), up to its recompile limit, with the warning (tests/test_compile.py's
        # eager-model case took 37 s, its compiled model 12; now 15-18).  So while traced, it is
        # the compiled model's opaque op (NOTE: [backward statistics]), and, as for a compiled
        # model, an input-gradient pass counts (NOTE: [gradient passes]).  The op takes the
        # call's forward generation (NOTE: [forward before zero_grad]) as a CPU tensor, made
        # once per generation: as an int the graph would guard on it, new at each iteration.
        # A recomputed call's H (NOTE: [recomputation]) waits for this hook: the op takes its
        # inputs too (traced as it runs eagerly, such a hook broke the graph twice more than
        # AdamW's backward has, under reentrant checkpointing).
        def hook(grad):
            if torch.compiler.is_compiling():
                torch.ops.adafisher.output_grad_stats(
                    grad, self.key, fisher.layers.index(lay), which, generation_t,
                    [x for _, x in recomputed or ()], [w for w, _ in recomputed or ()])
                return
            if _computes_grad(params, self._grad_nodes):        # NOTE: [gradient passes]
                self._backward_stats(lay, which, grad, generation, recomputed or ())

        return hook

    def _backward_stats(self, lay: Layer, which: int, grad: torch.Tensor,
                        generation: Optional[int], recomputed) -> None:
        """What a gradient hook of a call of ``lay.modules[which]`` adds, eagerly or inside the
        op: ``generation``, its forward's (None: a compiled model's, which knows none);
        ``recomputed``: (which, input) of the recomputed calls whose H waited for it.  Never
        traced: compiled, the hook is an opaque op that runs this (NOTE: [backward
        statistics], [compiled autograd])."""
        fisher = self.fisher
        if generation is None:
            fisher.compiled = True              # NOTE: [compiled forward before zero_grad]
        elif generation != fisher.generation:   # NOTE: [forward before zero_grad]
            fisher.adopt_held(lay, generation)
        for w, x in recomputed:
            self._h_stats(lay, lay.module_at(w), x, False)
        module = lay.module_at(which)
        with _no_grad(False):
            s = lay.kind.s_input(module, grad.detach())
            acc = fisher.acc(lay.s_factor, lay.s_acc, False)
            rows = lay.kind.s_stats(module, s, acc, fisher.preset, self._stats_ops(False))
            fisher.add_rows(lay.s_factor, _rows(lay, "s_stats", rows), False)
        fisher.flush_after_backward()

    def set_steps(self, steps: int, TCov: int, cleared: bool = False) -> None:
        """``cleared``: step() zeroed the buffer just before (NOTE: [clean buffer] in state.py)."""
        self.steps = steps
        self.collecting = self.fisher.gathering = steps % TCov == 0
        if not cleared:
            self.fisher.dirty = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
