"""What do the two presets do?  A small CPU study: ``python -m bench.study`` (full, < 15 min on one
CPU core) or ``python -m bench.study --quick`` (smoke test, < 1 min).

Tasks (both run offline, nothing is downloaded):

* ``digits``: a 3-layer CNN (Conv2d, Conv2d, Linear) on scikit-learn's bundled 8x8 digits
  (``sklearn.datasets.load_digits``, 1797 images, stratified 80/20 train/test split); reports the
  final loss on the whole training set and the test accuracy.
* ``charlm``: a 2-block pre-LN character-level transformer (Embedding, learned positions, Linear
  q/k/v, LayerNorm, MLP, Linear head; causal attention through ``scaled_dot_product_attention``) on
  the concatenated reStructuredText dataset descriptions that ship with scikit-learn
  (``sklearn/datasets/descr/*.rst``, sorted by file name, ~43 KB).  Why this text: it is real English
  technical prose (not generated), it is installed with a dependency the project already has, so the
  study runs offline and byte-identically on any machine with the same scikit-learn, and it is small
  enough for a CPU.  The last 10% of the characters are the validation set; reports the mean training
  loss of the last 20 steps and the validation loss (nats per character).

Optimizers: AdaFisher and AdaFisherW under preset="official" and preset="paper" (defaults Lambda=1e-3,
gamma=0.8, TCov=100; AdaFisherW with weight_decay=1e-2), AdamW (weight_decay=1e-2), and the
*predicted twin* of the official preset: bias-corrected momentum (beta=0.9) whose step is lr/Lambda on
the parameters of the layers the official preset hooks (Linear, Conv2d, BatchNorm2d, LayerNorm) and lr
on the others (F = 1 there), i.e. what AdaFisher official becomes when S'H' << Lambda.  Each runs over
a small learning-rate grid and 3 seeds; ``--lambdas`` adds paper-preset runs with other Lambda values.

Outputs (``--out``, default bench/results/study-<today>/; the committed run is
study-2026-11-24/): ``results.jsonl`` (one JSON object per run, loss curve included), ``study.md``
(tables), ``loss_<task>.png`` (mean loss curves over the seeds that did not diverge).
A run "diverges" when its loss becomes non-finite or exceeds 3x its initial loss; it is then stopped.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from adafisher_fast import AdaFisher, AdaFisherW
from adafisher_fast.report import curvature_report

from .common import md_table

OFFICIAL_HOOKED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)


# ----------------------------------------------------------------------------------------------
class MomentumTwin(torch.optim.Optimizer):
    """Bias-corrected momentum, p <- p - lr * scale * m_hat, m <- beta m + (1 - beta) g: AdaFisher's
    update with F fixed to 1/scale (scale = 1/Lambda predicts the official preset)."""

    def __init__(self, groups, lr, beta=0.9):
        super().__init__(groups, dict(lr=lr, beta=beta, scale=1.0))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"] = 0, torch.zeros_like(p)
                st["t"] += 1
                st["m"].mul_(g["beta"]).add_(p.grad, alpha=1 - g["beta"])
                p.add_(st["m"], alpha=-g["lr"] * g["scale"] / (1 - g["beta"] ** st["t"]))


def twin_groups(model, Lambda):
    hooked, rest = [], []
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        (hooked if isinstance(m, OFFICIAL_HOOKED) else rest).extend(own)
    groups = [{"params": hooked, "scale": 1.0 / Lambda}]
    return groups + ([{"params": rest, "scale": 1.0}] if rest else [])


# ----------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab, d=48, heads=4, layers=2, ctx=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos[: idx.shape[1]])))


# ----------------------------------------------------------------------------------------------
def digits_task():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]

    def batch(gen, bs=64):
        i = torch.randint(0, len(ytr), (bs,), generator=gen)
        return xtr[i], ytr[i]

    def evaluate(model):
        with torch.no_grad():
            train_loss = F.cross_entropy(model(xtr), ytr).item()
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        return train_loss, acc

    return dict(name="digits", model=DigitsCNN, batch=batch, evaluate=evaluate,
                loss=lambda model, b: F.cross_entropy(model(b[0]), b[1]), metric="test_acc",
                final="full")


def charlm_task(ctx=32):
    import sklearn
    files = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr",
                                          "*.rst")))
    text = "".join(open(f, encoding="utf-8").read() for f in files)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.int64)
    split = int(0.9 * len(data))
    tr, va = data[:split], data[split:]
    g = torch.Generator().manual_seed(1234)
    vstarts = torch.randint(0, len(va) - ctx - 1, (64,), generator=g)
    vx = torch.stack([va[s:s + ctx] for s in vstarts])
    vy = torch.stack([va[s + 1:s + ctx + 1] for s in vstarts])

    def batch(gen, bs=32):
        s = torch.randint(0, len(tr) - ctx - 1, (bs,), generator=gen)
        return torch.stack([tr[i:i + ctx] for i in s]), torch.stack([tr[i + 1:i + ctx + 1] for i in s])

    def lm_loss(model, b):
        out = model(b[0])
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), b[1].reshape(-1))

    def evaluate(model):
        with torch.no_grad():
            return None, lm_loss(model, (vx, vy)).item()

    return dict(name="charlm", model=lambda: CharLM(len(chars), ctx=ctx), batch=batch,
                evaluate=evaluate, loss=lm_loss, metric="val_loss", final="last20",
                info=f"{len(files)} files, {len(text)} chars, vocab {len(chars)}")


# ----------------------------------------------------------------------------------------------
def make_opt(arm, model, lr, Lambda):
    if arm == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    if arm == "twin":
        return MomentumTwin(twin_groups(model, Lambda), lr=lr)
    cls, preset = arm.split("-")
    cls = {"AdaFisher": AdaFisher, "AdaFisherW": AdaFisherW}[cls]
    wd = 1e-2 if cls is AdaFisherW else 0.0
    return cls(model, lr=lr, Lambda=Lambda, preset=preset, weight_decay=wd)


def run_one(task, arm, lr, seed, steps, Lambda=1e-3, log_every=5):
    torch.manual_seed(seed)
    model = task["model"]()
    opt = make_opt(arm, model, lr, Lambda)
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve, losses, diverged, first = [], [], False, None
    t0 = time.time()
    for it in range(steps):
        b = task["batch"](gen)
        opt.zero_grad()
        loss = task["loss"](model, b)
        v = loss.item()
        first = v if first is None else first
        losses.append(v)
        if it % log_every == 0:
            curve.append(v)
        if not math.isfinite(v) or v > 3 * first:
            diverged = True
            break
        loss.backward()
        opt.step()
    rec = dict(task=task["name"], arm=arm, lr=lr, Lambda=Lambda if arm != "AdamW" else None,
               seed=seed, steps=steps, diverged=diverged, curve=curve, log_every=log_every)
    if not diverged:
        train_loss, metric = task["evaluate"](model)
        if task["final"] == "last20":
            train_loss = sum(losses[-20:]) / len(losses[-20:])
        rec.update(final_train_loss=train_loss, **{task["metric"]: metric})
    if isinstance(opt, AdaFisher):
        rep = curvature_report(opt)
        shares = [r["curvature_share"] for r in rep if math.isfinite(r["curvature_share"])]
        rec["curvature_share"] = sum(shares) / len(shares) if shares else None
        rec["layer_shares"] = {r["name"]: r["curvature_share"] for r in rep}
        rec["stat_iters"] = max((r["stat_iters"] for r in rep), default=0)
    rec["seconds"] = time.time() - t0
    return rec


# ----------------------------------------------------------------------------------------------
def fmt(xs, digits=3):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def write_outputs(recs, out, tasks, args):
    groups = defaultdict(list)
    for r in recs:
        groups[(r["task"], r["arm"], r["Lambda"], r["lr"])].append(r)
    lines = [f"# AdaFisher preset study ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python -m bench.study {' '.join(args.argv)}`.  CPU, 1 thread, float32; "
             f"{len(recs)} runs.  Metrics are mean ± std over the seeds that did not diverge.  "
             f"Curvature share = mean over hooked layers of curvature_report()'s share at the end.", ""]
    for t in tasks:
        metric = t["metric"]
        lines += [f"## {t['name']} ({t.get('info', 'sklearn digits, 1437 train / 360 test')}, "
                  f"{args.steps[t['name']]} steps)", ""]
        cells = []
        for (task, arm, lam, lr), rs in sorted(groups.items(), key=lambda kv: (
                kv[0][1], kv[0][2] or 0, kv[0][3])):
            if task != t["name"]:
                continue
            ok = [r for r in rs if not r["diverged"]]
            cells.append((arm, lam if lam is not None else "-", f"{lr:g}",
                          fmt([r["final_train_loss"] for r in ok]), fmt([r[metric] for r in ok]),
                          fmt([r.get("curvature_share") for r in ok]),
                          f"{len(rs) - len(ok)}/{len(rs)}"))
        lines += md_table(["optimizer", "Lambda", "lr", "final train loss", metric,
                           "curvature share", "diverged"], cells)
        # does official track its twin?  mean |loss_official - loss_twin| along the curve, same seed
        lines += ["", "Official preset vs its predicted twin (same seed and batches): mean absolute "
                  "difference of the logged training-loss curves, and of the final train loss.", ""]
        cells = []
        for arm in ("AdaFisher-official", "AdaFisherW-official"):
            for lr in args.lrs:
                diffs, fdiffs = [], []
                for s in args.seeds:
                    a = [r for r in groups.get((t["name"], arm, 1e-3, lr), []) if r["seed"] == s]
                    b = [r for r in groups.get((t["name"], "twin", 1e-3, lr), []) if r["seed"] == s]
                    if a and b and not a[0]["diverged"] and not b[0]["diverged"]:
                        ca, cb = a[0]["curve"], b[0]["curve"]
                        diffs.append(sum(abs(x - y) for x, y in zip(ca, cb)) / len(ca))
                        fdiffs.append(abs(a[0]["final_train_loss"] - b[0]["final_train_loss"]))
                if diffs:
                    cells.append((arm, f"{lr:g}", fmt(diffs, 4), fmt(fdiffs, 4)))
        lines += md_table(["optimizer", "lr", "mean abs curve diff", "final train loss diff"],
                          cells) + [""]
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for t in tasks:
        lrs = sorted({r["lr"] for r in recs if r["task"] == t["name"]})
        fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 4), squeeze=False)
        for ax, lr in zip(axes[0], lrs):
            for (task, arm, lam, lr2), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2] or 0)):
                if task != t["name"] or lr2 != lr:
                    continue
                # the mean of the runs that did not diverge: a diverged run's curve stops early
                # and cut every other curve to its length
                ok = [r for r in rs if not r["diverged"]] or rs
                n = min(len(r["curve"]) for r in ok)
                y = np.mean([r["curve"][:n] for r in ok], axis=0)
                label = arm + (f" L={lam:g}" if lam not in (None, 1e-3) else "")
                if any(r["diverged"] for r in rs):
                    label += f" ({sum(r['diverged'] for r in rs)}/{len(rs)} diverged)"
                ax.plot(np.arange(n) * rs[0]["log_every"], y, label=label,
                        ls="--" if arm == "twin" else "-")
            ax.set_title(f"{t['name']}: lr={lr:g}")
            ax.set_xlabel("step")
            ax.set_ylabel("train loss (mean over seeds)")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"loss_{t['name']}.png"), dpi=90)
        plt.close(fig)


def main(argv=None):
    import sys
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, lr 1e-3, few steps")
    p.add_argument("--out", default=None)
    p.add_argument("--tasks", default="digits,charlm")
    p.add_argument("--arms", default="AdaFisher-official,AdaFisher-paper,AdaFisherW-official,"
                                     "AdaFisherW-paper,AdamW,twin")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lambdas", default="", help="extra Lambda values for AdaFisher-paper runs")
    p.add_argument("--digits-steps", type=int, default=500)
    p.add_argument("--charlm-steps", type=int, default=300)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    if args.quick:
        args.lrs, args.seeds, args.digits_steps, args.charlm_steps = "1e-3", "0", 40, 20
    args.lrs = [float(v) for v in args.lrs.split(",")]
    args.seeds = [int(v) for v in args.seeds.split(",")]
    args.steps = {"digits": args.digits_steps, "charlm": args.charlm_steps}
    # a new dated folder: a rerun must not overwrite the committed results it is compared with
    out = args.out or ("/tmp/adafisher-study-quick" if args.quick else os.path.join(
        os.path.dirname(__file__), "results", f"study-{time.strftime('%Y-%m-%d')}"))
    os.makedirs(out, exist_ok=True)
    makers = {"digits": digits_task, "charlm": charlm_task}
    tasks = [makers[n]() for n in args.tasks.split(",")]
    jobs = [(t, arm, lr, s, 1e-3) for t in tasks for arm in args.arms.split(",")
            for lr in args.lrs for s in args.seeds]
    jobs += [(t, "AdaFisher-paper", lr, s, float(lam)) for lam in filter(None, args.lambdas.split(","))
             for t in tasks for lr in args.lrs for s in args.seeds]
    recs = []
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for t, arm, lr, s, lam in tqdm(jobs, desc="study runs"):
            r = run_one(t, arm, lr, s, args.steps[t["name"]], Lambda=lam)
            recs.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
    write_outputs(recs, out, tasks, args)
    print(open(os.path.join(out, "study.md")).read())
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
