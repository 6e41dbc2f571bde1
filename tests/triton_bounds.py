"""Memory bounds of interpreted Triton kernels (TRITON_INTERPRET=1).

NOTE: [interpreter bounds] The interpreter loads, stores and does atomics through raw addresses
without checking them.  An address outside every tensor -- a wrong mask, an offset computed in
too narrow an integer type, a partial-sums buffer one row short -- faults or silently corrupts
memory on a GPU, and on the CPU it corrupts the heap, which crashes later, somewhere else, or
not at all.  ``install()`` (conftest, whenever kernels are interpreted) checks every active
address of every load, store and atomic before it happens, and raises ``OutOfBounds`` naming the
kernel, the access and the nearest tensor.

An address is in bounds when its element lies wholly inside the memory span of a tensor the
kernel may reach: its tensor arguments, and, for kernels that read pointers out of a table
(fused_step), every tensor that the public launcher was given or that its ``_launch`` puts in
the table.  A span is from the tensor's first element to one past its last (its view, not its
whole storage): a kernel that strays from its slice of a flat buffer into the next one's is
caught too.
"""
import contextlib
import dataclasses
import functools
import threading

import numpy as np
import torch
import triton.runtime.interpreter as interp


class OutOfBounds(AssertionError):
    """A kernel's load, store or atomic touched memory outside the tensors it may reach."""


_state = threading.local()          # .kernel: name; .spans: list of (lo, hi) address pairs


def _stack():
    if not hasattr(_state, "spans"):
        _state.spans, _state.kernel = [], None
    return _state.spans


def tensors_in(obj, out=None):
    """Every tensor in obj: a tensor, or nested lists, tuples, dicts and dataclasses of them."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(getattr(obj, "base", None), torch.Tensor):     # triton's TensorWrapper
        out.append(obj.base)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            tensors_in(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            tensors_in(o, out)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            tensors_in(getattr(obj, f.name), out)
    return out


def span(t: torch.Tensor):
    """[lo, hi) of the bytes t's elements occupy (None when it has none)."""
    if t.numel() == 0:
        return None
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return lo, lo + (last + 1) * t.element_size()


@contextlib.contextmanager
def reachable(objs, kernel=None):
    """Within: the tensors in objs are in bounds (and, if given, ``kernel`` names the access)."""
    stack = _stack()
    spans = [s for s in map(span, tensors_in(objs)) if s is not None]
    stack.append(spans)
    was = _state.kernel
    _state.kernel = kernel or was
    try:
        yield
    finally:
        stack.pop()
        _state.kernel = was


def _merged():
    """(starts, ends) of the union of the reachable spans, sorted and disjoint."""
    spans = sorted(s for level in _stack() for s in level)
    starts, ends = [], []
    for lo, hi in spans:
        if starts and lo <= ends[-1]:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64)


def check(ptrs, mask, what: str) -> None:
    """Raise OutOfBounds unless every address of ``ptrs`` (a TensorHandle of pointers) where
    ``mask`` is true lies, with its element, inside a reachable span."""
    addr = np.asarray(ptrs.data, dtype=np.uint64).ravel()
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape).ravel()]
    if addr.size == 0:
        return
    size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
    starts, ends = _merged()
    at = np.searchsorted(starts, addr, side="right").astype(np.int64) - 1
    ok = at >= 0
    ok[ok] = addr[ok] + size <= ends[at[ok]]
    if ok.all():
        return
    bad = addr[~ok]
    first = int(bad[0])
    near = min(zip(starts.tolist(), ends.tolist()),
               key=lambda se: min(abs(first - se[0]), abs(first - se[1])), default=None)
    where = ("no tensor is reachable" if near is None else
             f"the nearest reachable tensor spans [{near[0]:#x}, {near[1]:#x}): the address is "
             f"{first - near[0]:+d} bytes from its start, {first - near[1]:+d} from its end")
    raise OutOfBounds(f"{_state.kernel or 'a Triton kernel'}: {what} of {bad.size} of {addr.size} "
                      f"active addresses out of bounds; first {first:#x}, {int(size)}-byte "
                      f"elements; {where} (NOTE: [interpreter bounds])")


def _checked(name, what, ptr_arg, mask_arg):
    original = getattr(interp.InterpreterBuilder, name)

    @functools.wraps(original)
    def method(self, *args):
        check(args[ptr_arg], None if mask_arg is None else args[mask_arg], what)
        return original(self, *args)

    method.__wrapped_for_bounds__ = original
    return method


# (builder method, access, index of its pointer argument, of its mask argument or None)
_ACCESSES = (("create_masked_load", "load", 0, 1), ("create_masked_store", "store", 0, 2),
             ("create_atomic_rmw", "atomic", 1, 3), ("create_atomic_cas", "atomic_cas", 0, None))


def install(launchers=()) -> None:
    """Check every interpreted kernel's accesses (idempotent).  ``launchers``: (module, name)
    pairs of functions whose tensor arguments the kernels they launch may reach through pointer
    tables."""
    if getattr(interp.GridExecutor.__call__, "__wrapped_for_bounds__", None) is not None:
        return
    for name, what, p, m in _ACCESSES:
        setattr(interp.InterpreterBuilder, name, _checked(name, what, p, m))
    run = interp.GridExecutor.__call__

    @functools.wraps(run)
    def call(self, *args, **kwargs):
        with reachable([args, kwargs], getattr(self.fn, "__name__", None)):
            return run(self, *args, **kwargs)

    call.__wrapped_for_bounds__ = run
    interp.GridExecutor.__call__ = call
    for module, name in launchers:
        fn = getattr(module, name)

        def launcher(*args, _fn=fn, **kwargs):
            with reachable([args, kwargs]):
                return _fn(*args, **kwargs)

        setattr(module, name, functools.wraps(fn)(launcher))
