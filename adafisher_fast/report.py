"""Curvature diagnostics: what AdaFisher's preconditioner is doing on your model, layer by layer.

``curvature_report(opt)`` returns one flat dict per hooked layer:

* ``name``, ``kind`` (module class), ``preset``, ``stat_iters`` (statistics iterations that updated
  the layer), ``nonfinite_skips`` (statistics iterations skipped because the raw statistics were not
  finite);
* ``h_min``/``h_mean``/``h_max``: H' over the layer's whole H' vector (bias entries included),
  ``s_min``/``s_mean``/``s_max``: the same for S' (the values the update reads);
* ``f_param``: the layer's largest parameter with curvature factors (its weight for the built-in
  kinds; ``gamma`` for a LayerScale kind; None if none has factors, e.g. a parametrized weight);
* ``f_min``/``f_mean``/``f_max``: F = S'[row] * H'[col] + Lambda over the elements of that
  parameter (NaN without one);
* ``curvature_share``: mean over those elements of S'H' / F, in [0, 1).  0 means F is just
  Lambda (the step is plain momentum scaled by 1/Lambda); near 1 means the curvature dominates the
  damping.

Everything is computed on the host from ONE small device-to-host copy of the factor vector and the
counters, only when called; nothing is added to the training step.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from .reference import fisher_diag

def _mmm(t: torch.Tensor, prefix: str) -> Dict[str, float]:
    if t.numel() == 0:
        return {f"{prefix}_min": math.nan, f"{prefix}_mean": math.nan, f"{prefix}_max": math.nan}
    return {f"{prefix}_min": float(t.min()), f"{prefix}_mean": float(t.mean()),
            f"{prefix}_max": float(t.max())}


def curvature_report(opt) -> List[dict]:
    """One dict per hooked layer of ``opt`` (an AdaFisher/AdaFisherW); see the module docstring."""
    fisher = opt.fisher
    n_fac = fisher.fac.numel()
    # one device-to-host copy: H'/S' (float64 on the host) followed by the counters
    host = torch.cat([fisher.fac.detach().to(torch.float64),
                      fisher.counters.detach().reshape(-1).to(torch.float64)]).cpu()
    fac, counters = host[:n_fac], host[n_fac:].reshape(-1, 2).to(torch.int64)
    lam = float(opt.Lambda)
    rows = []
    for i, lay in enumerate(fisher.layers):
        h, s = fac[lay.h_raw], fac[lay.s_raw]
        # the layer kind's mapped names, not named_parameters(): an exposed attention's
        # in_proj reaches its owner's parameters through properties
        name, w = max(((n, p) for n, p in ((n, getattr(lay.module, n)) for n in lay.pnames)
                       if fisher.owner.get(id(p)) is lay),
                      key=lambda np_: np_[1].numel(), default=(None, None))
        row = {"name": lay.label, "kind": type(lay.module).__name__,
               "preset": opt.preset, "stat_iters": int(counters[i, 0]),
               "nonfinite_skips": int(counters[i, 1]), "f_param": name}
        row.update(_mmm(h, "h"))
        row.update(_mmm(s, "s"))
        if w is not None:
            f = fisher_diag(fac, fisher.meta[id(w)], lam)
            row.update(_mmm(f, "f"))
            row["curvature_share"] = float(((f - lam) / f).mean()) if f.numel() else math.nan
        else:
            row.update(_mmm(torch.empty(0), "f"))
            row["curvature_share"] = math.nan
        rows.append(row)
    return rows


def format_report(rows: List[dict]) -> str:
    """A plain-text table of ``curvature_report`` rows (one line per layer)."""
    cols = [("layer", lambda r: r["name"]), ("kind", lambda r: r["kind"]),
            ("iters", lambda r: str(r["stat_iters"])), ("skips", lambda r: str(r["nonfinite_skips"])),
            ("F of", lambda r: r["f_param"] or "-")]
    for k, label in (("h", "H'"), ("s", "S'"), ("f", "F")):
        cols.append((f"{label} min/mean/max",
                     lambda r, k=k: "/".join(f"{r[f'{k}_{q}']:.3g}" for q in ("min", "mean", "max"))))
    cols.append(("curv.share", lambda r: f"{r['curvature_share']:.3f}"))
    table = [[label for label, _ in cols]] + [[fn(r) for _, fn in cols] for r in rows]
    widths = [max(len(line[j]) for line in table) for j in range(len(cols))]
    out = ["  ".join(c.ljust(wd) for c, wd in zip(line, widths)).rstrip() for line in table]
    out.insert(1, "  ".join("-" * wd for wd in widths))
    head = f"AdaFisher curvature report (preset={rows[0]['preset']!r})\n" if rows else ""
    return head + "\n".join(out)
