"""Microbenchmark of ``layer_ema`` (SPEC 4.4, first launch): every layer's EMA and min/max at once,
on the LayerTable a real AdaFisher optimizer builds for ResNet-18 CIFAR, ResNet-50 and GPT-2 small,
under both presets.  Tiny data: this op is launch/latency bound; the time is what matters.

Bytes model (``es`` = buffer element size, T = number of terms of the table):

| op         | bytes counted                                                                |
|------------|------------------------------------------------------------------------------|
| layer_ema  | read buf + read/write state + write fac: es * (n_buf + 2 n_state + n_fac), plus the table: T * (3 * 8 + 3 * es) |
"""
from __future__ import annotations

from adafisher_fast.presets import PRESETS

from . import models
from .harness import Harness, LazyCase, run_cases
from .optsetup import OptSetup

OP = "layer_ema"


def _models(smoke: bool):
    if smoke:
        return [("r18-w8", lambda: models.resnet18_cifar(width=8)),
                ("gpt-tiny", lambda: models.GPT(vocab=64, d=32, n_layer=2, n_head=2, block_size=16))]
    return [("r18", models.resnet18_cifar), ("r50", models.resnet50), ("gpt2-small", models.gpt2_small)]


def cases(h: Harness):
    out = []
    for label, factory in _models(h.smoke):
        for preset in ("official", "paper"):
            def setup(factory=factory, preset=preset, label=label):
                s = OptSetup(factory, h.device, preset)
                f = s.opt.fisher
                es = f.buf.element_size()
                t = f.table.term_src.numel()
                rule = PRESETS[preset].ema_rule(0.8)

                def build(ops):
                    return lambda: ops.layer_ema(f.buf, f.table, f.state, f.fac, f.initialized,
                                                 f.counters, rule)

                nbytes = es * (f.buf.numel() + 2 * f.state.numel() + f.fac.numel()) + t * (24 + 3 * es)
                return dict(label=f"{label} {preset} ({len(f.layers)} layers, {f.state.numel()} entries)",
                            shape=[len(f.layers), f.state.numel()], dtype=str(f.buf.dtype)[6:],
                            bytes=nbytes, build=build, extra=dict(layers=len(f.layers), terms=t),
                            keep=s)
            out.append(LazyCase(f"{label} {preset}", setup))
    return out


def run(h: Harness) -> None:
    for c in cases(h):
        run_cases(h, OP, [c])
        c.release()
