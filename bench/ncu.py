"""``python -m bench.ncu [--device cpu|cuda] [--out DIR] [--ops a,b] [--backends cuda,triton]
[--cases REGEX] [--time-limit-s S]``, then ``python -m bench.ncu --table DIR``: each op's kernels at SPEC 8's
shapes, one call per (case, backend), for Nsight Compute (issue 5: profile what misses a target).
.ci/gpu's ``ncu`` stage runs it as::

    ncu --profile-from-start off --clock-control none --csv --page raw --print-units base \\
        --section SpeedOfLight --section LaunchStats --section Occupancy \\
        --metrics dram__bytes_read.sum,dram__bytes_write.sum --log-file DIR/ncu.csv \\
        python -m bench.ncu --out DIR

which writes DIR/ncu_cases.json (here) and DIR/ncu.csv (ncu); ``--table DIR`` joins the two into
DIR/ncu.md: per kernel its time, DRAM and SM throughput (% of peak), achieved occupancy, grid,
block and registers, and per case the GB/s of the bench's bytes model (bench/README.md).

NOTE: [profile markers] Each case runs after two warm-up calls (JIT, autotuning), between
cudaProfilerStart/Stop, as a marker kernel (``torch.cuda._sleep``: its ``spin_kernel`` runs nowhere
else) then the op's call.  In ncu's rows the kernels after the n-th marker are case n's, however many
the call launches (a split reduction two, the torch reference many), with no NVTX to parse.

On CPU (``--device cpu --backends torch``: no profiler, no markers) it calls the smoke cases, so
that it cannot rot.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from adafisher_fast.backends import OPS

from .common import md_table

# the cases SPEC 8's targets are stated on (fp32): conv's two im2col anchors, the 124M step, ...
DEFAULT_CASES = {
    "linear_stats": r"^gpt2 c_attn|^r18 conv1 ",
    "conv_stats": r"r50 layers\.0\.conv2 |r18 layers\.0\.conv1 ",
    "norm_stats": r"^bn r18 256x64x|^ln gpt2|^gn unet3d",
    "embedding_stats": r"vocab 50257",
    "layer_ema": r"r18 paper|gpt2-small paper",
    "fused_step": r"124M",
}
MARKER = "spin_kernel"          # torch.cuda._sleep's kernel (NOTE: [profile markers])
COLUMNS = [("time us", "gpu__time_duration.sum", 1e-3),
           ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed", 1),
           ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
           ("occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active", 1),
           ("DRAM MB", ("dram__bytes_read.sum", "dram__bytes_write.sum"), 1e-6),
           ("grid", "launch__grid_size", 1), ("block", "launch__block_size", 1),
           ("regs", "launch__registers_per_thread", 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ncu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda if available, else cpu (smoke cases, no profiler)")
    ap.add_argument("--out", type=Path, default=Path("results_local/ncu"))
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--cases", default=None, help="label regex for every op (default: SPEC 8's)")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="start no case after this many seconds (ncu writes its CSV at exit)")
    ap.add_argument("--table", type=Path, default=None, metavar="DIR",
                    help="write DIR/ncu.md from DIR/ncu.csv and DIR/ncu_cases.json, and print it")
    args = ap.parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        ap.error(f"--ops: unknown {sorted(unknown)}; known: {','.join(OPS)}")
    run(args)
    return 0


def run(args) -> list:
    """Call every selected case once per backend (warm, NOTE: [profile markers]); write and return
    [{op, case, backend, dtype, bytes[, error]}] in call order, one per marker kernel."""
    from .harness import Harness, LazyCase, available_backends
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as scratch:      # the harness writes no rows here
        h = Harness(dev, dev.type == "cpu", scratch, args.backends.split(","), verbose=False)
    backends, missing = available_backends(h)
    for name, why in missing:
        print(f"# {name}: not profiled: {why}")
    t0, done = time.perf_counter(), []
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for op in args.ops.split(","):
            pattern = re.compile(args.cases or DEFAULT_CASES[op])
            cases = importlib.import_module(f"bench.bench_{op}").cases(h)
            for c in cases[:1] if h.smoke else cases:
                if not (h.smoke or (pattern.search(c.label) and getattr(c, "dtype", "float32")
                                    in ("float32", "int64", ""))):
                    continue
                if args.time_limit_s is not None and time.perf_counter() - t0 > args.time_limit_s:
                    print(f"# {op} {c.label}: not started, --time-limit-s reached")
                    continue
                lazy = c if isinstance(c, LazyCase) else None
                c = lazy.get() if lazy else c
                if isinstance(c, dict):
                    print(f"# {op} {c['label']}: not profiled: {c['why']}")
                    continue
                for name, ops in backends:
                    done += _call(h, op, c, name, ops)
                if lazy:
                    lazy.release()
    finally:
        (args.out / "ncu_cases.json").write_text(json.dumps(done, indent=1))
    print(f"# profiled {len(done)} calls in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return done


def _call(h, op, c, backend, ops) -> list:
    """[the case's entry] once its marker is launched (NOTE: [profile markers]), else []."""
    entry = {"op": op, "case": c.label, "backend": backend, "dtype": c.dtype, "bytes": c.bytes}
    with torch.no_grad():
        try:
            fn = c.build(ops)
            fn()
            fn()
            h.sync()
        except Exception as e:                  # one case failing is a line, not the end of the run
            print(f"# {op} {c.label} {backend}: not profiled: {type(e).__name__}: {e}")
            return []
        if h.cuda:
            torch.cuda.profiler.start()
            torch.cuda._sleep(1)
        try:
            fn()
            h.sync()
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"[:200]
        finally:
            if h.cuda:
                torch.cuda.profiler.stop()
    return [entry]


def _number(s: str):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def _value(row: dict, metric, scale):
    names = metric if isinstance(metric, tuple) else (metric,)
    vals = [_number(row.get(n, "")) for n in names]
    return None if any(v is None for v in vals) else sum(vals) * scale


def _kernel(row: dict) -> str:
    for k in ("Kernel Name", "Demangled Name", "Function Name"):
        if row.get(k):
            return row[k]
    return ""


def kernels_by_case(csv_text: str, n_cases: int) -> list:
    """ncu's raw CSV (``--csv --page raw``; lines ncu prints with ``==`` skipped, as is the units
    row) split at the marker kernels: a list of n_cases lists of row dicts."""
    lines = [l for l in csv_text.splitlines() if l.strip() and not l.startswith("==")]
    rows = [r for r in csv.DictReader(lines) if _number(r.get("ID", "")) is not None]
    rows.sort(key=lambda r: _number(r["ID"]))
    out, i = [[] for _ in range(n_cases)], -1
    for r in rows:
        if MARKER in _kernel(r):
            i += 1
        elif 0 <= i < n_cases:
            out[i].append(r)
    if i + 1 != n_cases:
        raise ValueError(f"ncu.csv has {i + 1} marker kernels ({MARKER}), ncu_cases.json "
                         f"{n_cases} cases: not the same run")
    return out


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}")


def table(folder: Path) -> str:
    """DIR/ncu.md (module docstring): one row per kernel; a case's first row carries its GB/s
    (bench bytes / the sum of its kernels' times)."""
    cases = json.loads((folder / "ncu_cases.json").read_text())
    per_case = kernels_by_case((folder / "ncu.csv").read_text(errors="replace"), len(cases))
    body = []
    for c, rows in zip(cases, per_case):
        times = [_value(r, COLUMNS[0][1], COLUMNS[0][2]) for r in rows]
        gbps = (c["bytes"] / (sum(times) * 1e3) if rows and None not in times and sum(times) > 0
                else None)
        for j, r in enumerate(rows or [{}]):
            name = (re.sub(r"^void |\(.*", "", _kernel(r))[:60]
                    or f"({c.get('error', 'no kernel')})")
            lead = [c["op"], c["case"], c["backend"], _fmt(gbps)] if j == 0 else ["", "", "", ""]
            body.append(lead + [name.replace("|", "/")]
                        + [_fmt(_value(r, m, s)) for _, m, s in COLUMNS])
    head = ["op", "case", "backend", "GB/s", "kernel"] + [c for c, _, _ in COLUMNS]
    text = "\n".join(md_table(head, body)) + "\n"
    (folder / "ncu.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
