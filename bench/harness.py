"""The one benchmark harness: timing, environment, peak bandwidth, rows, table, plots.

Every benchmark (``bench_<op>.py``, ``bench_e2e.py``) calls ``Harness.time`` and ``Harness.add``;
nothing else here knows an op.

Timing (``Harness.time``): ``warmup`` untimed calls, then ``iters`` timed calls, each timed alone
* on CUDA with a pair of CUDA events, after zeroing a 256 MiB buffer so that the call starts with a
  cold L2 (what ``triton.testing.do_bench`` does; NOTE: [cold L2]);
* on CPU with ``time.perf_counter``.
The row keeps the median (``time_ms``) and the 20%/80% quantiles and minimum.

NOTE: [cold L2] The H100's L2 is 50 MiB (an H200's 60 MB): an op over a 10 MB tensor timed in a
tight loop would read it from L2 and report more than the HBM bandwidth.  The flush is outside the
timed region.

Peak bandwidth (``Harness.peak_bandwidth``): a device-to-device copy of 1 GiB (CUDA) or 64 MiB
(CPU), bytes = read + write; its GB/s is the 100% of the ``pct_peak`` column of the same run.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

def _versions() -> Dict[str, Any]:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:           # triton is optional on CPU
        triton_v = None
    return {"torch": torch.__version__, "triton": triton_v, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def default_out_dir(device: torch.device) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-")
    return Path(__file__).resolve().parent / "results" / f"{slug}-{_dt.date.today().isoformat()}"


def quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Harness:
    def __init__(self, device: torch.device, smoke: bool, out_dir: Path,
                 backends: Optional[List[str]] = None, verbose: bool = True, append: bool = False,
                 time_limit_s: Optional[float] = None, backend_suffix: str = ""):
        self.device = device
        self.backend_suffix = backend_suffix   # "+det" for a --deterministic run's rows
        # NOTE: [run deadline] with --time-limit-s no case or configuration starts after this
        # time.monotonic(); those left are ``skipped`` rows, so a run cut short by a per-command
        # limit still ends with its table and plots and says what it did not measure
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.smoke = smoke
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: List[Dict[str, Any]] = []
        self.verbose = verbose
        self.backend_filter = backends
        self.budget_s = 3.0             # NOTE: [time budget] per timed case, seconds
        self.env = {"device": device.type, "gpu": device_name(device), **_versions(),
                    "smoke": smoke, "host": platform.node()}
        self.peak_gbps: Optional[float] = None
        self._flush = None
        if device.type == "cuda":
            self._flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
        self.jsonl = self.out_dir / "results.jsonl"
        if not append or not self.jsonl.exists():
            self.jsonl.write_text("")

    # --------------------------------------------------------------------------------------
    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def out_of_time(self, **row) -> bool:
        """True past the run's deadline (NOTE: [run deadline]), after adding ``row`` as a
        ``skipped`` row."""
        if self.deadline is None or time.monotonic() < self.deadline:
            return False
        self.add(**row, status="skipped", note="not started: the run's --time-limit-s was reached")
        return True

    def iters(self, gpu: int, cpu: int = 5, smoke: int = 3) -> int:
        """Iteration count for this run: ``smoke`` in smoke runs, ``cpu`` on CPU, else ``gpu``."""
        return smoke if self.smoke else (gpu if self.cuda else cpu)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], warmup: int = None, iters: int = None,
             flush_l2: bool = True) -> Dict[str, float]:
        """Median/quantiles in ms of ``fn()`` over ``iters`` calls (module docstring)."""
        warmup = warmup if warmup is not None else (1 if self.smoke else 10)
        iters = iters if iters is not None else self.iters(100, 10, 3)
        for _ in range(warmup):
            fn()
        self.sync()
        # one more call, after warm-up (the first calls include JIT compilation and autotuning)
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        if not self.smoke and first * iters > self.budget_s:
            # NOTE: [time budget] slow cases (the torch reference on 1B parameters) get fewer
            # iterations, never fewer than 5, so that one case cannot eat the whole session
            iters = max(5, int(self.budget_s / max(first, 1e-9)))
        times = []
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for i in range(iters):
                if flush_l2:
                    self._flush.zero_()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times)

    def reset_peak_memory(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mib(self) -> Optional[float]:
        """Peak allocated since ``reset_peak_memory``, less the harness's own L2-flush buffer
        (256 MiB, live the whole run): what the case allocated."""
        if self.cuda:
            flush = self._flush.numel() if self._flush is not None else 0
            return (torch.cuda.max_memory_allocated(self.device) - flush) / 2 ** 20
        return None

    def free_memory_bytes(self) -> Optional[int]:
        if self.cuda:
            torch.cuda.empty_cache()
            return torch.cuda.mem_get_info(self.device)[0]
        return None

    # --------------------------------------------------------------------------------------
    def peak_bandwidth(self) -> float:
        """GB/s of a large device-to-device copy (module docstring); the 100% of ``pct_peak``."""
        n = (8 if self.smoke else (1024 if self.cuda else 64)) * 2 ** 20
        src = torch.empty(n, dtype=torch.uint8, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        t = self.time(lambda: dst.copy_(src), iters=self.iters(50, 10, 3), flush_l2=False)
        del src, dst
        self.peak_gbps = 2 * n / (t["time_ms"] * 1e-3) / 1e9
        self.add(kind="peak_bw", op="copy", case=f"d2d copy {n // 2 ** 20} MiB", backend="torch",
                 shape=[n], dtype="uint8", timing=t, bytes=2 * n)
        return self.peak_gbps

    # --------------------------------------------------------------------------------------
    def add(self, *, kind: str, op: str, case: str, backend: str, shape=None, dtype: str = "",
            timing: Optional[Dict[str, float]] = None, bytes: Optional[float] = None,
            status: str = "ok", note: str = "", **extra) -> Dict[str, Any]:
        """Append one result row (and write it to results.jsonl at once, so that a crash keeps
        everything measured before it)."""
        if backend != "*":
            backend += self.backend_suffix
        row: Dict[str, Any] = {"kind": kind, "op": op, "case": case, "backend": backend,
                               "shape": shape, "dtype": dtype, "status": status, "note": note}
        timing = timing or {}
        row.update({k: timing.get(k) for k in ("time_ms", "q20_ms", "q80_ms", "min_ms", "n_iters")})
        row["bytes"] = bytes
        gbps = None
        if bytes and row["time_ms"]:
            gbps = bytes / (row["time_ms"] * 1e-3) / 1e9
        row["gbps"] = gbps
        row["pct_peak"] = (100.0 * gbps / self.peak_gbps) if (gbps and self.peak_gbps) else None
        row.update(extra)
        row.update(self.env)
        row["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        if self.verbose:
            t = f"{row['time_ms']:.4f} ms" if row["time_ms"] is not None else status
            bw = f"  {gbps:8.1f} GB/s" if gbps else ""
            pk = f" ({row['pct_peak']:.0f}%)" if row["pct_peak"] else ""
            case = f"{case} {extra['optimizer']}" if "optimizer" in extra else case
            case = f"{case} [{extra['mode']}]" if extra.get("mode", "eager") != "eager" else case
            print(f"[{kind}] {op:16s} {backend:12s} {case:40s} {dtype:9s} {t}{bw}{pk}"
                  + (f"  -- {note}" if note else ""), flush=True)
        return row

    def guard(self, *, kind: str, op: str, case: str, backend: str, shape=None, dtype: str = "",
              **extra):
        """Context manager: an exception inside becomes an ``error`` row (the run goes on);
        ``extra``: more columns of that row (e2e: optimizer, workload, mode)."""
        return _Guard(self, dict(kind=kind, op=op, case=case, backend=backend, shape=shape,
                                 dtype=dtype, **extra))


class _Guard:
    def __init__(self, h: Harness, fields: Dict[str, Any]):
        self.h, self.fields = h, fields

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        if et is None or issubclass(et, KeyboardInterrupt):
            return False
        msg = f"{et.__name__}: {e}".splitlines()[0][:300]
        self.h.add(**self.fields, status="error", note=msg)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exception(et, e, tb)
        if self.h.cuda:
            torch.cuda.synchronize(self.h.device)
            torch.cuda.empty_cache()
        return True


def summarize(times: List[float]) -> Dict[str, float]:
    return {"time_ms": quantile(times, 0.5), "q20_ms": quantile(times, 0.2),
            "q80_ms": quantile(times, 0.8), "min_ms": min(times), "n_iters": len(times)}


def available_backends(h: Harness):
    """[(name, ops module)] of every backend that loads on this device, and [(name, why)] of
    those that do not (reported as ``skipped`` rows by the callers).  The kernel backends
    first: a run cut short (NOTE: [run deadline]) loses the torch reference's rows first."""
    from adafisher_fast import backends
    ok, missing = [], []
    for name in ("cuda", "triton", "torch"):
        if h.backend_filter and name not in h.backend_filter:
            continue
        mod, why = backends._try_load(name, h.device)
        (ok.append((name, mod)) if mod is not None else missing.append((name, why)))
    return ok, missing


class Case:
    """One shape of one op: ``build(ops)`` returns the zero-argument callable to time (inputs
    allocated once, outside the timed region); ``baselines`` are extra (name, build()) pairs timed
    beside the backends (im2col for conv statistics, AdamW for the step)."""

    def __init__(self, label: str, shape, dtype: str, bytes: float, build: Callable,
                 baselines=(), **extra):
        self.label, self.shape, self.dtype, self.bytes = label, shape, dtype, bytes
        self.build, self.baselines, self.extra = build, list(baselines), extra


class LazyCase:
    """A case whose inputs are big (a whole model's optimizer): ``setup()`` runs on first use and
    returns Case's fields as a dict (plus ``keep``: what to hold alive; or ``why``: cannot run
    here, reported as a skipped row); ``release()`` frees it."""

    def __init__(self, label: str, setup: Callable[[], Dict[str, Any]]):
        self.label, self._setup, self._case, self._keep = label, setup, None, None

    def get(self):
        if self._case is None:
            d = self._setup()
            if "why" in d:
                self._case = d
            else:
                self._keep = d.pop("keep", None)
                extra = d.pop("extra", {})
                self._case = Case(**d, **extra)
        return self._case

    def release(self) -> None:
        self._case = self._keep = None
        import gc
        gc.collect()


def run_cases(h: Harness, op: str, cases: List[Case], ratio_to: Optional[str] = None) -> None:
    """Time every case on every backend that loads (and its baselines); ``ratio_to``: the
    baseline whose time each row is divided by (column ``ratio``)."""
    ok, missing = available_backends(h)
    for name, why in missing:
        h.add(kind="op", op=op, case="*", backend=name, status="skipped", note=why)
    for c in cases:
        if h.out_of_time(kind="op", op=op, case=c.label, backend="*"):
            continue
        if isinstance(c, LazyCase):
            lazy, c = c, None
            with h.guard(kind="op", op=op, case=lazy.label, backend="setup"):
                c = lazy.get()
            if c is None:
                continue
        if isinstance(c, dict):     # a case that cannot run here: {"label", "why"}
            h.add(kind="op", op=op, case=c["label"], backend="*", shape=c.get("shape"),
                  status="skipped", note=c["why"])
            continue
        base_ms = {}
        runs = [(n, (lambda b=b: b())) for n, b in c.baselines] + \
               [(n, (lambda m=m: c.build(m))) for n, m in ok]
        for name, make in runs:
            with h.guard(kind="op", op=op, case=c.label, backend=name, shape=c.shape, dtype=c.dtype):
                h.reset_peak_memory()
                fn, nbytes = make(), c.bytes
                if isinstance(fn, tuple):           # (fn, bytes) when a baseline moves more
                    fn, nbytes = fn
                with torch.no_grad():               # ops run inside step(), under no_grad
                    t = h.time(fn)
                del fn
                base_ms[name] = t["time_ms"]
                ratio = (t["time_ms"] / base_ms[ratio_to]) if ratio_to in base_ms else None
                # peak over this case's inputs + the op's temporaries (im2col's patch matrix)
                h.add(kind="op", op=op, case=c.label, backend=name, shape=c.shape, dtype=c.dtype,
                      timing=t, bytes=nbytes, ratio=ratio, ratio_to=ratio_to,
                      peak_mem_mib=h.peak_memory_mib(), **c.extra)
        if h.cuda:
            torch.cuda.empty_cache()
