"""``python -m bench [--device cpu|cuda] [--smoke] [--out DIR] [--only ops|e2e] [--ops a,b]
[--backends torch,triton,cuda] [--modes eager,cudagraph,compile] [--time-limit-s S]
[--deterministic]``: the whole benchmark suite, one command (see bench/README.md)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from adafisher_fast.backends import OPS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda if available, else cpu (cpu implies --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few iterations (seconds)")
    ap.add_argument("--full-cpu", action="store_true",
                    help="on CPU, run the real shapes instead of the smoke ones (slow)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default bench/results/<device-name>-<date>/)")
    ap.add_argument("--only", choices=("ops", "e2e"), default=None)
    ap.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--backends", default=None, help="comma-separated subset of torch,triton,cuda")
    ap.add_argument("--modes", default=None,
                    help="end-to-end execution modes, comma-separated subset of "
                         "eager,cudagraph,compile, run in the order given (default: all three, "
                         "in that order, on cuda; eager,compile on cpu, where cudagraph cannot "
                         "run)")
    ap.add_argument("--append", action="store_true",
                    help="add to the folder's results.jsonl instead of starting it afresh (to split "
                         "a run: --only ops, then --only e2e --append); the table covers all rows")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="start no case after this many seconds; the rest become skipped rows and "
                         "the table and plots are still written (NOTE: [run deadline])")
    ap.add_argument("--deterministic", action="store_true",
                    help="run under torch.use_deterministic_algorithms(True) (NOTE: [ordered "
                         "partials]), with backends named <name>+det: appended beside a default "
                         "run, the rows show what reproducibility costs")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from .bench_e2e import MODES
    if args.modes is not None and set(args.modes.split(",")) - set(MODES):
        ap.error(f"--modes: unknown {sorted(set(args.modes.split(',')) - set(MODES))}; "
                 f"known: {','.join(MODES)}")

    import torch
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    device = torch.device(dev)
    smoke = args.smoke or (dev == "cpu" and not args.full_cpu)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if dev == "cpu":
        torch.set_num_threads(1)        # shared CI machines: one thread is faster and steadier
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # else cuBLAS refuses the flag
        torch.use_deterministic_algorithms(True)
    try:
        return _run(args, ap, device, smoke)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _run(args, ap, device, smoke) -> int:

    from .harness import Harness, default_out_dir
    from . import report
    out = args.out or default_out_dir(device)
    h = Harness(device, smoke, out, args.backends.split(",") if args.backends else None,
                verbose=not args.quiet, append=args.append, time_limit_s=args.time_limit_s,
                backend_suffix="+det" if args.deterministic else "")
    t0 = time.perf_counter()
    print(f"# bench: {h.env['gpu']} torch {h.env['torch']} triton {h.env['triton']} "
          f"smoke={smoke} -> {out}", flush=True)
    h.peak_bandwidth()
    ops = args.ops.split(",") if args.ops else list(OPS)
    unknown = set(ops) - set(OPS)
    if unknown:
        ap.error(f"--ops: unknown {sorted(unknown)}")
    interrupted = False
    try:
        if args.only in (None, "ops"):
            for op in ops:
                mod = importlib.import_module(f"bench.bench_{op}")
                with h.guard(kind="op", op=op, case="*", backend="*"):
                    mod.run(h)
        if args.only in (None, "e2e"):
            from . import bench_e2e
            with h.guard(kind="e2e", op="e2e", case="*", backend="*"):
                bench_e2e.run(h, args.modes.split(",") if args.modes else None)
    except KeyboardInterrupt:
        # SIGINT (.ci/gpu's deadline): every row measured so far is in results.jsonl already
        interrupted = True
        print("# interrupted: writing the table and plots of the rows measured so far", flush=True)
    written = report.write(report.load(out), out)
    n_err = sum(r["status"] == "error" for r in h.rows)
    print(f"# {len(h.rows)} rows ({n_err} errors) in {time.perf_counter() - t0:.1f} s: "
          f"{h.jsonl}, " + ", ".join(str(p) for p in written), flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
