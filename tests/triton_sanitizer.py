"""A memory and race check for interpreted Triton kernels (TRITON_INTERPRET=1): what
compute-sanitizer's memcheck does on a GPU, and a check of global memory between programs, which
its racecheck (shared memory only) does not make.

NOTE: [interpreter sanitizer] The interpreter loads, stores and does atomics through raw
addresses without checking them, and runs a launch's programs one after another.  So a kernel
that reaches outside its tensors (a wrong mask, an offset in too narrow an integer type, a
partial-sums buffer one row short) corrupts the CPU heap, which crashes later, somewhere else, or
not at all; and one whose programs depend on each other's order (one stores what another loads
or stores, unordered) gives the right answer here and any answer on a GPU.  ``install()``
(conftest, whenever kernels are interpreted) checks both:

- bounds, before each access: every active address of a load, store or atomic must lie, with
  its element, inside the span of a tensor the kernel may reach -- its tensor arguments and, for
  kernels that read pointers out of a table (fused_step), every tensor that its launchers were
  given.  A span runs from a tensor's first element to one past its last (its view, not its
  storage), so a kernel that strays from its slice of a flat buffer into the next is caught.
  ``OutOfBounds`` names the kernel, the access and the nearest tensor, and the access does not
  happen.
- races, after each launch: an address that one program stores and another loads, stores or
  updates atomically, or that one program updates atomically and another loads, is a race.
  Atomics between themselves are not.  A kernel orders its programs by a ticket, each program's
  first atomic: the last program to take one may touch, after it, what the others touched before
  theirs (it finishes the work, NOTE: [step tickets]).  So the last ticket-taker's accesses after
  its ticket are checked against the other programs' accesses after theirs only; every other
  pair is checked.  ``Race`` names the kernel, the address, the accesses and the programs.
- uninitialised memory: the backend's ops run poisoned (tests/poison.py), so a kernel that
  reads scratch no program wrote gives NaN.
- hints, after each launch: what a kernel tells the compiler of a value with ``tl.multiple_of``
  and ``tl.max_contiguous`` must hold for every program, since the compiled kernel trusts it (a
  pointer said to be 16-byte aligned gets 16-byte loads, which fault on a GPU where it is not)
  and the interpreter ignores it.  Per dimension d of divisibility v and contiguity c (1 when
  not given): the entries at indices 0, c, 2c, ... along d are multiples of v (bytes, for
  pointers), and each run of c entries from there counts up by one (one element, for
  pointers).  ``BadHint`` names the kernel, the hint and the first value that breaks it.
"""
import contextlib
import dataclasses
import functools
import threading

import numpy as np
import torch
import triton.runtime.interpreter as interp

import poison

_LOAD, _STORE, _ATOMIC = 0, 1, 2
_KINDS = ("load", "store", "atomic")


class OutOfBounds(AssertionError):
    """A kernel's load, store or atomic touched memory outside the tensors it may reach."""


class Race(AssertionError):
    """Two programs of one launch accessed an address without an order between them."""


class BadHint(AssertionError):
    """A kernel's tl.multiple_of or tl.max_contiguous said what a value is not."""


class _Launch:
    """The accesses of one launch's programs: (kind, program, after its ticket, addresses) as
    they happen; the programs run one after another, so the last to take a ticket (its first
    atomic) is the last program seen taking one."""

    def __init__(self, kernel):
        self.kernel, self.accesses, self.ticketed, self.last = kernel, [], set(), None
        self.hinted = {}        # id -> TensorHandle given a hint (checked at the launch's end)

    def record(self, kind: int, addr: np.ndarray) -> None:
        gx, gy, _ = interp.interpreter_builder.grid_dim
        x, y, z = interp.interpreter_builder.grid_idx
        pid = x + gx * (y + gy * z)
        after = pid in self.ticketed
        if kind == _ATOMIC and not after:
            self.ticketed.add(pid)
            self.last = pid
        self.accesses.append((kind, pid, after, addr))

    def check(self) -> None:
        for h in self.hinted.values():
            check_hints(h, self.kernel)
        if not self.accesses:
            return
        addr = np.concatenate([a for *_, a in self.accesses])

        def each(field):
            return np.concatenate([np.full(acc[3].size, acc[field], np.int64)
                                   for acc in self.accesses])

        kind, pid, after = each(0), each(1), each(2).astype(bool)
        finisher = after & (pid == (-1 if self.last is None else self.last))
        for sel in (~finisher, after):      # NOTE: [interpreter sanitizer]: the ticket's order
            self._check(addr[sel], pid[sel], kind[sel])

    def _check(self, addr, pid, kind) -> None:
        if not addr.size:
            return
        at, group = np.unique(addr, return_inverse=True)

        stride = int(pid.max()) + 1

        def programs(sel):          # per address: how many programs made the selected accesses
            pairs = np.unique(group[sel] * stride + pid[sel])
            return np.bincount(pairs // stride, minlength=at.size)

        def has(k):
            return np.bincount(group[kind == k], minlength=at.size) > 0

        racy = ((has(_STORE) & (programs(slice(None)) > 1))
                | (has(_LOAD) & has(_ATOMIC) & (programs(kind != _STORE) > 1)))
        if not racy.any():
            return
        first = at[racy][0]
        who = sorted({(int(p), _KINDS[k]) for p, k in zip(pid[addr == first], kind[addr == first])})
        raise Race(f"{self.kernel}: {int(racy.sum())} addresses accessed by several programs "
                   f"without an order between them; first {int(first):#x}: "
                   + ", ".join(f"program {p} {k}" for p, k in who)
                   + " (NOTE: [interpreter sanitizer])")


class _State(threading.local):
    def __init__(self):
        self.spans = []         # a stack of lists of reachable (lo, hi) address pairs
        self.merged = []        # per level of spans: _merged() of it and the levels below
        self.launch = None      # the _Launch running


_state = _State()


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
def reachable(objs):
    """Within: the tensors in objs are in bounds."""
    _state.spans.append([s for s in map(span, tensors_in(objs)) if s is not None])
    _state.merged.append(_merged())
    try:
        yield
    finally:
        _state.merged.pop()
        _state.spans.pop()


def _merged():
    """(starts, ends) of the union of the reachable spans, sorted and disjoint."""
    starts, ends = [], []
    for lo, hi in sorted(s for level in _state.spans for s in level):
        if starts and lo <= ends[-1]:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64)


def _active(ptrs, mask) -> np.ndarray:
    addr = np.asarray(ptrs.data, dtype=np.uint64).ravel()
    if mask is None:
        return addr
    return addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape).ravel()]


def check_bounds(ptrs, addr: np.ndarray, what: str) -> None:
    """Raise OutOfBounds unless every address in ``addr`` (of ``ptrs``, a TensorHandle of
    pointers) lies, with its element, inside a reachable span."""
    if addr.size == 0:
        return
    size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
    starts, ends = _state.merged[-1] if _state.merged else _merged()
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
    launch = _state.launch
    raise OutOfBounds(f"{launch.kernel if launch else 'a Triton kernel'}: {what} of {bad.size} "
                      f"of {addr.size} active addresses out of bounds; first {first:#x}, "
                      f"{int(size)}-byte elements; {where} (NOTE: [interpreter sanitizer])")


def check_hints(h, kernel: str) -> None:
    """Raise BadHint unless the TensorHandle h is what its divisibility and contiguity hints say
    (NOTE: [interpreter sanitizer])."""
    d = np.asarray(h.data)
    if d.ndim == 0:
        d = d.reshape(1)
    ptr = h.dtype.is_ptr()
    step = max(1, h.get_element_ty().primitive_bitwidth // 8) if ptr else 1
    what = f"a value of {d.shape} {'addresses' if ptr else 'entries'}"
    ones = [1] * d.ndim
    div, con = h.attr.get("tt.divisibility", ones), h.attr.get("tt.contiguity", ones)
    for ax in range(d.ndim):
        v, c = int(div[ax]), int(con[ax])
        heads = np.take(d, np.arange(0, d.shape[ax], c), axis=ax).astype(np.int64)
        bad = heads[heads % v != 0]
        if bad.size:
            first = int(bad.ravel()[0])
            raise BadHint(f"{kernel}: tl.multiple_of({v}) on {what} (dim {ax}, runs of {c}) that "
                          f"is {f'{first:#x}' if ptr else first} (NOTE: [interpreter sanitizer])")
        if c > 1:
            gaps = np.diff(d.astype(np.int64), axis=ax)
            inside = (np.arange(gaps.shape[ax]) + 1) % c != 0     # within a run of c
            gaps = np.compress(inside, gaps, axis=ax)
            if (gaps != step).any():
                raise BadHint(f"{kernel}: tl.max_contiguous({c}) on {what} (dim {ax}) whose runs "
                              f"step by {int(gaps[gaps != step].ravel()[0])}, not {step} "
                              f"(NOTE: [interpreter sanitizer])")


def _hinted(original):
    @functools.wraps(original)
    def set_attr(self, key, value):
        original(self, key, value)
        if key in ("tt.divisibility", "tt.contiguity") and _state.launch is not None:
            _state.launch.hinted[id(self)] = self

    return set_attr


def _checked(name, kind, ptr_arg, mask_arg):
    original = getattr(interp.InterpreterBuilder, name)

    @functools.wraps(original)
    def method(self, *args):
        ptrs = args[ptr_arg]
        addr = _active(ptrs, None if mask_arg is None else args[mask_arg])
        check_bounds(ptrs, addr, _KINDS[kind])
        if _state.launch is not None:
            _state.launch.record(kind, addr)
        return original(self, *args)

    return method


# (builder method, access kind, index of its pointer argument, of its mask argument or None)
_ACCESSES = (("create_masked_load", _LOAD, 0, 1), ("create_masked_store", _STORE, 0, 2),
             ("create_atomic_rmw", _ATOMIC, 1, 3), ("create_atomic_cas", _ATOMIC, 0, None))


def install(ops=(), launchers=()) -> None:
    """Check every interpreted kernel's accesses (once per process).  ``ops``: (module, name)
    pairs of the backend's ops, which run poisoned and whose tensor arguments their kernels may
    reach through pointer tables; ``launchers``: more functions whose tensor arguments their
    kernels may reach so."""
    if getattr(interp.GridExecutor, "_sanitized", False):
        return
    interp.GridExecutor._sanitized = True
    for name, kind, p, m in _ACCESSES:
        setattr(interp.InterpreterBuilder, name, _checked(name, kind, p, m))
    interp.TensorHandle.set_attr = _hinted(interp.TensorHandle.set_attr)
    run = interp.GridExecutor.__call__

    @functools.wraps(run)
    def call(self, *args, **kwargs):
        outer, _state.launch = _state.launch, _Launch(getattr(self.fn, "__name__", "a kernel"))
        try:
            with reachable([args, kwargs]):
                run(self, *args, **kwargs)
            _state.launch.check()
        finally:
            _state.launch = outer

    interp.GridExecutor.__call__ = call
    for module, name in ops:
        setattr(module, name, poison.poisoned(wrap(getattr(module, name))))
    for module, name in launchers:
        setattr(module, name, wrap(getattr(module, name)))


def wrap(fn):
    """fn, whose tensor arguments are reachable (NOTE: [interpreter sanitizer]) while it runs."""
    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        with reachable([args, kwargs]):
            return fn(*args, **kwargs)

    return launcher
