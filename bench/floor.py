"""Bandwidth floor of a statistics iteration: ``python -m bench.floor [--results DIR]
[--peak-gbps G] [--out DIR]``.

SPEC 8 allows a TCov=1 iteration 6% (ResNet-18) and 3% (GPT) more time than AdamW(fused)'s.
Whatever the kernels, the statistics of an iteration read every hooked layer's input and output
gradient at least once: this counts those bytes for bench_e2e's workloads (float32, both presets)
by running one iteration on the meta device (no data, no GPU) with the backend's statistics ops
wrapped, each call adding the bytes of the tensor it reads.  With a peak bandwidth (the d2d copy
row of a results folder's ``results.jsonl``, or ``--peak-gbps``) that is a time: the least any
implementation that reads its inputs from memory adds to the iteration.  Given a results folder,
each row also shows that run's AdamW(fused) iteration, the time SPEC 8's ratio leaves for
AdaFisher, and what AdaFisher TCov=1 measured over AdamW on each backend (the e2e rows use the
official preset), so that a miss can be read as the kernels' distance from the floor, or as
time that no statistics kernel spends.  Rows: ``DIR/floor.jsonl`` and the printed table.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import warnings
from pathlib import Path
from typing import Optional

import torch

from adafisher_fast import AdaFisher

from . import bench_e2e
from .common import md_table, write_jsonl

STATS_OPS = ("linear_stats", "conv_stats", "norm_stats", "embedding_stats")


class _Reads:
    """A backend's ops with each statistics call's input bytes added to ``n``."""

    def __init__(self, ops):
        self._ops, self.n = ops, 0

    def __getattr__(self, op):
        real = getattr(self._ops, op)
        if op not in STATS_OPS:
            return real

        def counted(x, *args, **kwargs):
            self.n += x.numel() * x.element_size()
            return real(x, *args, **kwargs)
        return counted


def stats_bytes(name: str, mk_model, mk_batch, preset: str) -> int:
    """The bytes the statistics ops of one TCov=1 iteration of workload ``name`` read."""
    torch.manual_seed(0)
    model = mk_model().to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisher(model, lr=1e-3, TCov=1, preset=preset, backend="torch")
    reads = opt._hooks.ops = _Reads(opt._hooks.ops)
    bench_e2e._loss(name, model, mk_batch()).backward()
    return reads.n


def _measured(results: Path):
    """(peak GB/s or None, {(workload, optimizer, backend): ms}) of a results folder's float32
    eager rows."""
    peak, e2e = None, {}
    for line in (results / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("status") != "ok":
            continue
        if r["kind"] == "peak_bw":
            peak = max(peak or 0.0, r["gbps"])
        elif r["kind"] == "e2e" and r.get("mode") == "eager" and r["dtype"] == "float32":
            e2e[(r["workload"], r["optimizer"], r["backend"])] = r["time_ms"]
    return peak, e2e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=None,
                    help="a results folder (results.jsonl): its peak bandwidth and e2e rows")
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak bandwidth, GB/s")
    ap.add_argument("--out", type=Path, default=None, help="folder for floor.jsonl")
    args = ap.parse_args(argv)
    peak, e2e = _measured(args.results) if args.results is not None else (None, {})
    peak = args.peak_gbps or peak
    h = types.SimpleNamespace(device=torch.device("meta"), smoke=False)
    rows = []
    for name, mk_model, mk_batch, desc in bench_e2e.workloads(h):
        for preset in ("official", "paper"):
            n = stats_bytes(name, mk_model, mk_batch, preset)
            row = dict(kind="stats_floor", workload=name, case=f"{name} {desc}", preset=preset,
                       dtype="float32", stats_bytes=n, peak_gbps=peak,
                       floor_ms=n / (peak * 1e6) if peak else None)
            adamw: Optional[float] = e2e.get((name, "adamw", "torch"))
            target = bench_e2e.TARGETS.get((name.split("-")[0], 1))
            if adamw is not None:
                row.update(adamw_ms=adamw, allowed_ms=(target - 1) * adamw if target else None,
                           floor_share=row["floor_ms"] / adamw if peak else None)
                if preset == "official":            # bench_e2e's AdaFisher rows
                    for backend in ("cuda", "triton"):
                        ms = e2e.get((name, "AdaFisher TCov=1", backend))
                        if ms is not None:
                            row[f"extra_ms_{backend}"] = ms - adamw
            rows.append(row)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    print(f"peak bandwidth: {fmt(peak, '.0f')} GB/s"
          + (f" ({args.results})" if args.results is not None else ""))
    def extra(r):
        if r["preset"] != "official" or "adamw_ms" not in r:
            return "-"
        return ", ".join(fmt(r.get(f"extra_ms_{b}"), ".2f") for b in ("cuda", "triton"))
    print("\n".join(md_table(
        ["workload", "preset", "statistics read GB", "floor ms", "floor / AdamW iteration",
         "SPEC 8 allows ms", "measured extra ms (cuda, triton)"],
        [(r["case"], r["preset"], f"{r['stats_bytes'] / 1e9:.3f}", fmt(r["floor_ms"], ".3f"),
          fmt(r.get("floor_share"), ".1%"), fmt(r.get("allowed_ms"), ".2f"), extra(r))
         for r in rows])))
    if args.out is not None:
        write_jsonl(args.out / "floor.jsonl", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
