"""Where an iteration's time goes: ``python -m bench.profile_e2e [--device cpu|cuda] [--smoke]
[--out DIR] [--iters N]``.

SPEC 8 wants a TCov=1 iteration within 1.06x (ResNet-18) and 1.03x (GPT) of AdamW(fused=True)'s;
the H200 run of 2026-12-04 measured 1.29x and 1.27x with the CUDA backend (README).  This splits
such a gap.  For AdamW(fused), and AdaFisher at TCov=1 and TCov=100 on every backend that loads,
SPEC 8's two eager fp32 workloads (``bench_e2e.workloads``) run ``--iters`` iterations after
warm-up under torch.profiler, and each row gives, per iteration:

- ``wall_ms``: host clock around the loop, synchronised at both ends;
- ``device_ms``: the sum of the device kernels' durations (0 on the CPU), and ``busy`` =
  device / wall: well under 1 means the host (Python, launches, a synchronisation) is the limit;
- per op of the backend (the six of SPEC 4, each call inside a profiler range
  ``adafisher::<op>``, added by this tool only): calls, host ms (the range's CPU time: the
  Python and the launches) and device ms (the kernels the profiler ties to a launch inside it;
  the top list below names every kernel, tied or not);
- ``syncs``: calls that make the host wait for the device (cudaStreamSynchronize,
  cudaDeviceSynchronize, cudaEventSynchronize, a blocking cudaMemcpy): one in a hook or in
  ``step()`` serialises the host with the device;
- ``top``: the kernels (or, on the CPU, operators) with the most device (CPU) time.

JSON lines in ``DIR/profile.jsonl`` and a markdown table ``DIR/profile.md``.  ``--smoke`` (and
CI, through tests/test_bench_smoke.py) runs the narrow models of ``bench_e2e``'s smoke mode.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from adafisher_fast.backends import OPS

from . import bench_e2e
from .common import md_table, write_jsonl
from .harness import Harness

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LABELS = ("adamw", "AdaFisher TCov=1", "AdaFisher TCov=100")


class _Ranged:
    """A backend's ops with each call inside the profiler range ``adafisher::<op>``."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        if name not in OPS:
            return fn

        def ranged(*args, **kwargs):
            with record_function(f"adafisher::{name}"):
                return fn(*args, **kwargs)
        return ranged


def _range_ops(opt) -> None:
    """Put the ranges around the ops that ``opt``'s hooks and ``step()`` call: they share one
    CompileAwareOps (custom_ops.py), which looks its wrapped ops up at every eager call."""
    aware = getattr(opt, "_ops", None)
    if aware is not None:
        aware._ops = _Ranged(aware._ops)


def _summary(prof, iters: int, wall_s: float, cuda: bool) -> dict:
    per = 1e-3 / iters                                  # us in total -> ms per iteration
    events = prof.key_averages()
    # the device's own events (kernels, copies, memsets): a CPU operator's device time is that
    # of the kernels it launched, counted again, and a range's GPU-side twin spans its kernels
    kernels = [e for e in events if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    device = sum(e.self_device_time_total for e in kernels) * per
    ops = {}
    for e in events:
        if e.key.startswith("adafisher::") and e.device_type == DeviceType.CPU:
            ops[e.key.split("::")[1]] = {"calls": e.count / iters,
                                         "host_ms": e.cpu_time_total * per,
                                         "device_ms": e.device_time_total * per}
    syncs = sum(e.count for e in events if e.key in SYNCS) / iters
    # the device's kernels by their time; on the CPU the operators by their self time
    rank = ([(e.key, e.self_device_time_total * per) for e in kernels] if cuda else
            [(e.key, e.self_cpu_time_total * per) for e in events
             if not e.key.startswith("adafisher::")])
    rank.sort(key=lambda kv: -kv[1])
    wall = wall_s * 1e3 / iters
    return {"wall_ms": wall, "device_ms": device, "busy": device / wall if cuda else None,
            "ops": ops, "syncs": syncs, "top": [[k, round(v, 4)] for k, v in rank[:8]]}


def profile_config(h: Harness, wname, mk_model, mk_batch, make_opt, iters: int) -> dict:
    """One configuration's row (module docstring)."""
    torch.manual_seed(0)
    model = mk_model().to(h.device)
    opt = make_opt(model)
    _range_ops(opt)
    batches = [mk_batch() for _ in range(4)]

    def iteration(i):
        opt.zero_grad(set_to_none=True)
        bench_e2e._loss(wname, model, batches[i % len(batches)]).backward()
        opt.step()

    for i in range(3):                                  # warm-up: state, tables, JIT
        iteration(i)
    sync = torch.cuda.synchronize if h.cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if h.cuda else [])
    with profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        for i in range(iters):
            iteration(i)
        sync()
        wall = time.perf_counter() - t0
    return _summary(prof, iters, wall, h.cuda)


def run(h: Harness, iters: int) -> list:
    rows = []
    for wname, mk_model, mk_batch, shape in bench_e2e.workloads(h):
        if wname == bench_e2e.CL_WORKLOAD:
            continue
        for label, _, backend, factory in bench_e2e._optimizers(h):
            if label not in LABELS:
                continue
            row = {"workload": wname, "shape": shape, "optimizer": label, "backend": backend,
                   **h.env}
            try:
                row.update(profile_config(h, wname, mk_model, mk_batch, factory, iters))
                row["status"] = "ok"
            except Exception as e:                      # a row says what failed, the rest run
                row.update(status="error", note=f"{type(e).__name__}: {e}")
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"[profile] {r['workload']} {r['optimizer']} {r['backend']}: {r['note']}"
    ops = ", ".join(f"{k} {v['device_ms']:.3f}/{v['host_ms']:.3f}" for k, v in r["ops"].items())
    return (f"[profile] {r['workload']} {r['optimizer']} {r['backend']}: "
            f"wall {r['wall_ms']:.3f} ms, device {r['device_ms']:.3f} ms, syncs {r['syncs']:g}; "
            f"ops device/host ms: {ops}")


def table(rows: list) -> str:
    head = ["workload", "optimizer", "backend", "wall ms", "device ms", "busy", "syncs",
            "statistics ops device / host ms", "layer_ema device / host ms",
            "fused_step device / host ms", "top kernels (ms)"]
    body = []
    for r in rows:
        lead = [r["workload"], r["optimizer"], r["backend"]]
        if r["status"] != "ok":
            body.append(lead + [f"**{r['status']}** {r.get('note', '')}"]
                        + [""] * (len(head) - len(lead) - 1))
            continue
        def cell(ops_of):                   # device / host ms summed over the ops it takes
            vs = [v for k, v in r["ops"].items() if ops_of(k)]
            return (f"{sum(v['device_ms'] for v in vs):.3f} / {sum(v['host_ms'] for v in vs):.3f}"
                    if vs else "")
        top = "; ".join(f"{k[:40]} {v:.3f}" for k, v in r["top"][:4])
        busy = "" if r["busy"] is None else f"{r['busy']:.2f}"
        body.append(lead + [f"{r['wall_ms']:.3f}", f"{r['device_ms']:.3f}", busy,
                            f"{r['syncs']:g}", cell(lambda k: k.endswith("_stats")),
                            cell("layer_ema".__eq__), cell("fused_step".__eq__), top])
    return "\n".join(md_table(head, body)) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="the narrow smoke-run models")
    p.add_argument("--out", default="results_local/bench")
    p.add_argument("--iters", type=int, default=None, help="profiled iterations (20; smoke 2)")
    p.add_argument("--backends", default=None, help="comma-separated AdaFisher backends (all)")
    a = p.parse_args(argv)
    device, out = torch.device(a.device), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:      # the harness's own results.jsonl
        h = Harness(device, a.smoke or device.type != "cuda", Path(scratch), verbose=False,
                    backends=a.backends.split(",") if a.backends else None)
        rows = run(h, a.iters or (2 if h.smoke else 20))
    write_jsonl(out / "profile.jsonl", rows)
    (out / "profile.md").write_text(table(rows))
    print(f"# {len(rows)} rows: {out / 'profile.jsonl'}, {out / 'profile.md'}")


if __name__ == "__main__":
    main()
