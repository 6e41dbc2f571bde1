"""Markdown table and PNG plots from the rows of one run (``results.jsonl``).

Usable on its own to re-render a results folder: ``python -m bench.report DIR``.
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List


def _f(v, fmt="{:.3f}"):
    return "" if v is None else fmt.format(v)


def load(out_dir: Path) -> List[Dict]:
    return [json.loads(l) for l in (Path(out_dir) / "results.jsonl").read_text().splitlines() if l]


def markdown(rows: List[Dict]) -> str:
    env = next((r for r in rows), {})
    lines = [f"# adafisher-fast benchmarks", "",
             f"device: **{env.get('gpu')}** | torch {env.get('torch')} | triton {env.get('triton')} "
             f"| CUDA {env.get('cuda')} | smoke: {env.get('smoke')} | {env.get('timestamp')}", ""]
    peak = [r for r in rows if r["kind"] == "peak_bw"]
    if peak:
        lines += [f"Peak bandwidth (100% of `% peak`): {peak[0]['gbps']:.1f} GB/s "
                  f"({peak[0]['case']}).", ""]
    ops = [r for r in rows if r["kind"] == "op"]
    by_op: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for r in ops:
        by_op.setdefault(r["op"], []).append(r)
    for op, rs in by_op.items():
        lines += [f"## {op}", "",
                  "| case | dtype | backend | median ms | q20-q80 ms | GB/s | % peak | ratio | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            ratio = _f(r.get("ratio"), "{:.3f}")
            if r.get("ratio") is not None:
                ratio += f" (vs {r.get('ratio_to')})"
            note = r.get("note") or ""
            if r.get("anchor_im2col_ms"):
                note += f" released: im2col {r['anchor_im2col_ms']} ms, x^2 sum {r['anchor_floor_ms']} ms (H100)"
            status = "" if r["status"] == "ok" else f"**{r['status']}** "
            lines.append(f"| {r['case']} | {r['dtype']} | {r['backend']} | {_f(r.get('time_ms'), '{:.4f}')} "
                         f"| {_f(r.get('q20_ms'), '{:.4f}')}-{_f(r.get('q80_ms'), '{:.4f}')} "
                         f"| {_f(r.get('gbps'), '{:.1f}')} | {_f(r.get('pct_peak'), '{:.1f}')} | {ratio} "
                         f"| {status}{note} |")
        lines.append("")
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        lines += ["## End to end (forward + backward + step)", "",
                  "`ratio` = iteration time / AdamW's (the headline; target in brackets); "
                  "`released` = the authors' code on an H100 in fp32 (SPEC 8).", "",
                  "| workload | dtype | optimizer | backend | ms/iter | **ratio to AdamW** | step() ms "
                  "| step ratio | peak MiB | released ms/iter | released step ms | released peak MiB | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            ratio = _f(r.get("ratio"))
            if r.get("target_ratio"):
                ratio += f" (<= {r['target_ratio']})"
            status = "" if r["status"] == "ok" else f"**{r['status']}** "
            lines.append(
                f"| {r['case']} | {r['dtype']} | {r.get('optimizer', '')} | {r['backend']} "
                f"| {_f(r.get('time_ms'), '{:.2f}')} | {ratio} | {_f(r.get('step_ms'), '{:.3f}')} "
                f"| {_f(r.get('step_ratio'), '{:.2f}')} | {_f(r.get('peak_mem_mib'), '{:.0f}')} "
                f"| {_f(r.get('anchor_time_ms'), '{}')} | {_f(r.get('anchor_step_ms'), '{}')} "
                f"| {_f(r.get('anchor_peak_mem_mib'), '{}')} | {status}{r.get('note') or ''} |")
        lines.append("")
    return "\n".join(lines)


def plots(rows: List[Dict], out_dir: Path) -> List[Path]:
    """ops_<op>.png: GB/s (or ms where no bytes) per case and backend; e2e.png: ratio to AdamW."""
    import matplotlib
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
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cases) * max(1, len(backs)) / 2), 4.5))
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
        labels = [f"{r['workload']} {r['dtype']} {r['optimizer']} [{r['backend']}]" for r in e2e]
        fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * len(e2e))))
        ax.barh(np.arange(len(e2e)), [r["ratio"] for r in e2e], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(np.arange(len(e2e)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("iteration time / AdamW iteration time")
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
