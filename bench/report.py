"""Markdown table and PNG plots from the rows of one run (``results.jsonl``).

Usable on its own to re-render a results folder: ``python -m bench.report DIR``.
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

from .common import md_table


def _f(v, fmt="{:.3f}"):
    return "" if v is None else fmt.format(v)


def _status(r: Dict) -> str:
    return "" if r["status"] == "ok" else f"**{r['status']}** "


def load(out_dir: Path) -> List[Dict]:
    return [json.loads(l) for l in (Path(out_dir) / "results.jsonl").read_text().splitlines() if l]


def markdown(rows: List[Dict]) -> str:
    env = next((r for r in rows), {})
    lines = ["# adafisher-fast benchmarks", "",
             f"device: **{env.get('gpu')}** | torch {env.get('torch')} | triton {env.get('triton')} "
             f"| CUDA {env.get('cuda')} | smoke: {env.get('smoke')} | {env.get('timestamp')}", ""]
    # the released code's figures (SPEC 8) are an H100's: on another GPU only the ratios compare
    if "H100" not in str(env.get("gpu")) and any(k.startswith("anchor_") for r in rows for k in r):
        lines += [f"The `released` figures were measured on an H100, this run on {env.get('gpu')}: "
                  "compare ratios (each to a baseline in this run), not milliseconds.", ""]
    peak = [r for r in rows if r["kind"] == "peak_bw"]
    if peak:
        lines += [f"Peak bandwidth (100% of `% peak`): {peak[0]['gbps']:.1f} GB/s "
                  f"({peak[0]['case']}).", ""]
    lines += targets(rows)
    ops = [r for r in rows if r["kind"] == "op"]
    by_op: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for r in ops:
        by_op.setdefault(r["op"], []).append(r)
    for op, rs in by_op.items():
        cells = []
        for r in rs:
            ratio = _f(r.get("ratio"), "{:.3f}")
            if r.get("ratio") is not None:
                ratio += f" (vs {r.get('ratio_to')})"
            note = r.get("note") or ""
            if r.get("anchor_im2col_ms"):
                note += f" released: im2col {r['anchor_im2col_ms']} ms, x^2 sum {r.get('anchor_x2sum_ms', r.get('anchor_floor_ms'))} ms (H100)"
            cells.append((r["case"], r["dtype"], r["backend"], _f(r.get("time_ms"), "{:.4f}"),
                          f"{_f(r.get('q20_ms'), '{:.4f}')}-{_f(r.get('q80_ms'), '{:.4f}')}",
                          _f(r.get("gbps"), "{:.1f}"), _f(r.get("pct_peak"), "{:.1f}"), ratio,
                          _status(r) + note))
        lines += [f"## {op}", ""] + md_table(["case", "dtype", "backend", "median ms",
                                              "q20-q80 ms", "GB/s", "% peak", "ratio", "note"],
                                             cells) + [""]
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        lines += ["## End to end (forward + backward + step)", "",
                  "`ratio` = iteration time / AdamW's in the same mode, workload and dtype (the "
                  "headline; SPEC 8 target in brackets, eager rows); `mode`: eager, `compile` "
                  "(torch.compile(model), step() eager) or `cudagraph` (whole iteration captured "
                  "and replayed; step() not timed apart); `host ms`: the host's time to queue one "
                  "iteration from an idle device, where it reaches ms/iter the iteration is "
                  "host-bound (NOTE: [host-bound iterations] in bench_e2e.py); `released` = the "
                  "authors' code on an H100 in fp32, eager (SPEC 8).", ""]
        cells = []
        for r in e2e:
            ratio = _f(r.get("ratio"))
            if r.get("target_ratio"):
                ratio += f" (<= {r['target_ratio']})"
            cells.append((r["case"], r["dtype"], r.get("mode", "eager"), r.get("optimizer", ""),
                          r["backend"], _f(r.get("time_ms"), "{:.2f}"), ratio,
                          _f(r.get("host_ms"), "{:.2f}"), _f(r.get("step_ms"), "{:.3f}"),
                          _f(r.get("step_ratio"), "{:.2f}"), _f(r.get("peak_mem_mib"), "{:.0f}"),
                          _f(r.get("anchor_time_ms"), "{}"), _f(r.get("anchor_step_ms"), "{}"),
                          _f(r.get("anchor_peak_mem_mib"), "{}"),
                          _status(r) + (r.get("note") or "")))
        lines += md_table(["workload", "dtype", "mode", "optimizer", "backend", "ms/iter",
                           "**ratio to AdamW**", "host ms", "step() ms", "step ratio", "peak MiB",
                           "released ms/iter", "released step ms", "released peak MiB", "note"],
                          cells) + [""]
    return "\n".join(lines)


def targets(rows: List[Dict]) -> List[str]:
    """SPEC section 8 targets, checked on this run's rows (per kernel backend)."""
    # the SPEC 8 end-to-end targets are eager figures: compile/cudagraph rows are not checked
    ok = [r for r in rows if r["status"] == "ok" and r.get("mode", "eager") == "eager"]
    kern = sorted({r["backend"] for r in ok if r["backend"] in ("torch", "triton", "cuda")},
                  key=("cuda", "triton", "torch").index)
    out = ["## SPEC 8 targets in this run", ""]

    def worst(pred, key, agg):
        return {b: (agg([r[key] for r in ok if r["backend"] == b and pred(r) and r.get(key) is not None])
                    if any(r["backend"] == b and pred(r) and r.get(key) is not None for r in ok) else None)
                for b in kern}

    def slowest_speedup(base):
        """Per backend, the least over conv_stats cases of ``base``'s time / the backend's."""
        conv = [r for r in ok if r["op"] == "conv_stats"]
        t = {(r["case"], r["dtype"]): r["time_ms"] for r in conv if r["backend"] == base}
        return {b: min((t[r["case"], r["dtype"]] / r["time_ms"] for r in conv
                        if r["backend"] == b and (r["case"], r["dtype"]) in t), default=None)
                for b in kern}

    specs = [
        # SPEC 8's im2col is the released code's; the leaner F.unfold one is the harder mark
        ("conv_stats: slowest speedup vs the released code's im2col (>= 30x)",
         slowest_speedup("released"), "{:.1f}x", lambda v: v >= 30, None),
        ("conv_stats: slowest speedup vs F.unfold im2col (>= 30x)",
         slowest_speedup("im2col"), "{:.1f}x", lambda v: v >= 30, None),
        ("conv_stats: lowest % of peak bandwidth (> 70%)",
         worst(lambda r: r["op"] == "conv_stats", "pct_peak", min), "{:.0f}%", lambda v: v > 70, None),
        ("fused_step 100M+ params: lowest % of peak (> 80%)",
         worst(lambda r: r["op"] == "fused_step" and (r.get("shape") or [0])[0] >= 1e8, "pct_peak", min),
         "{:.0f}%", lambda v: v > 80, None),
        ("fused_step: worst time / AdamW fused step (<= 0.8)",
         worst(lambda r: r["op"] == "fused_step", "ratio", max), "{:.2f}", lambda v: v <= 0.8, None),
    ]
    for wl, tc, lim in (("resnet18", 1, 1.06), ("resnet18", 100, 1.0), ("gpt4", 1, 1.03),
                        ("gpt4", 100, 1.0)):
        specs.append((f"{wl} fp32 TCov={tc}: worst iteration / AdamW (<= {lim})",
                      worst(lambda r, wl=wl, tc=tc: r["kind"] == "e2e" and r.get("workload") == wl
                            and r["dtype"] == "float32"
                            and (r.get("optimizer") or "").endswith(f"TCov={tc}"), "ratio", max),
                      "{:.3f}", lambda v, lim=lim: v <= lim, None))
    for wl in ("resnet18", "gpt4"):
        specs.append((f"{wl} fp32: worst step() / AdamW step() (<= 0.8, TCov=100)",
                      worst(lambda r, wl=wl: r["kind"] == "e2e" and r.get("workload") == wl
                            and r["dtype"] == "float32"
                            and (r.get("optimizer") or "").endswith("TCov=100"), "step_ratio", max),
                      "{:.2f}", lambda v: v <= 0.8, None))
        adam = [r.get("peak_mem_mib") for r in ok if r["kind"] == "e2e" and r.get("workload") == wl
                and r["dtype"] == "float32" and r.get("optimizer") == "adamw"]
        if adam and adam[0] is not None:
            specs.append((f"{wl} fp32: worst peak MiB (<= AdamW's {adam[0]:.0f})",
                          worst(lambda r, wl=wl: r["kind"] == "e2e" and r.get("workload") == wl
                                and r["dtype"] == "float32"
                                and "TCov" in (r.get("optimizer") or ""), "peak_mem_mib", max),
                          "{:.0f}", lambda v, a=adam[0]: v <= a, None))
    def verdict(v, fmt, good, show):
        if v is None:
            return "-"
        return f"{fmt.format(show(v) if show else v)} {'PASS' if good(v) else 'FAIL'}"
    out += md_table(["target"] + kern, [[name] + [verdict(vals[b], fmt, good, show) for b in kern]
                                        for name, vals, fmt, good, show in specs])
    return out + ["", "(`smoke` runs: tiny shapes on whatever device, the verdicts mean nothing.)", ""]


def plots(rows: List[Dict], out_dir: Path) -> List[Path]:
    """ops_<op>.png: GB/s (or ms where no bytes) per case and backend; e2e.png: ratio to AdamW.
    None without matplotlib (not in the package's extras): the JSON lines and table stand."""
    try:
        import matplotlib
    except ImportError:
        print("bench: matplotlib is not installed, so no plots (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    ok = [r for r in rows if r["status"] == "ok"]
    for op in OrderedDict.fromkeys(r["op"] for r in ok if r["kind"] == "op"):
        rs = [r for r in ok if r["kind"] == "op" and r["op"] == op]
        cases = list(OrderedDict.fromkeys(f"{r['case']} {r['dtype']}" for r in rs))
        backs = list(OrderedDict.fromkeys(r["backend"] for r in rs))
        use_pct = all(r.get("pct_peak") is not None for r in rs)
        fig, ax = plt.subplots(figsize=(min(24, max(6, 0.12 * len(cases) * max(1, len(backs)))), 5))
        w = 0.8 / max(1, len(backs))
        for i, b in enumerate(backs):
            vals = {f"{r['case']} {r['dtype']}": (r["pct_peak"] if use_pct else r["time_ms"])
                    for r in rs if r["backend"] == b}
            ax.bar(np.arange(len(cases)) + i * w, [vals.get(c, 0) for c in cases], w, label=b)
        ax.set_xticks(np.arange(len(cases)) + 0.4 - w / 2)
        ax.set_xticklabels(cases, rotation=70, ha="right", fontsize=6)
        ax.set_ylabel("% of peak bandwidth (d2d copy)" if use_pct else "median ms")
        ax.set_title(f"{op} ({rs[0]['gpu']})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"ops_{op}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    e2e = [r for r in ok if r["kind"] == "e2e" and r.get("ratio") is not None]
    if e2e:
        labels = [f"{r['workload']} {r['dtype']} {r.get('mode', 'eager')} {r['optimizer']} "
                  f"[{r['backend']}]" for r in e2e]
        fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * len(e2e))))
        ax.barh(np.arange(len(e2e)), [r["ratio"] for r in e2e], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(np.arange(len(e2e)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("iteration time / AdamW iteration time (same mode)")
        ax.set_title(f"end to end ({e2e[0]['gpu']})")
        fig.tight_layout()
        p = out_dir / "e2e.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def write(rows: List[Dict], out_dir: Path) -> List[Path]:
    out_dir = Path(out_dir)
    md = out_dir / "table.md"
    md.write_text(markdown(rows))
    return [md] + plots(rows, out_dir)


if __name__ == "__main__":
    d = Path(sys.argv[1])
    for p in write(load(d), d):
        print(p)
