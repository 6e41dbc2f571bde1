"""A real AdaFisher optimizer on a benchmark model, for the step-op benchmarks: its LayerTable,
flat buffers, param-map ``meta`` and the lists ``fused_step`` takes (via ``AdaFisher._gather``),
so that ``layer_ema`` / ``fused_step`` are timed on the tables the optimizer really builds."""
from __future__ import annotations

import warnings

import torch

from adafisher_fast import AdaFisher

from . import models


def model_sets(smoke: bool):
    """[(label, model factory)] of the parameter sets: 11M (ResNet-18), 124M (GPT-2 small),
    1.1B (GPT d=2048 x 20).  Smoke: two tiny models."""
    if smoke:
        return [("r18-w8", lambda: models.resnet18_cifar(width=8)),
                ("gpt-tiny", lambda: models.GPT(vocab=64, d=32, n_layer=2, n_head=2, block_size=16))]
    return [("r18 11M", models.resnet18_cifar), ("gpt2-small 124M", models.gpt2_small),
            ("gpt 1.1B", models.gpt_1b)]


def n_params(factory) -> int:
    """Parameter count without allocating (built on the meta device)."""
    with torch.device("meta"):
        m = factory()
    return sum(p.numel() for p in m.parameters())


class OptSetup:
    """Model + AdaFisher(backend="torch") on ``device`` with random gradients and raw statistics."""

    def __init__(self, factory, device, preset: str = "official", dtype=torch.float32):
        with torch.device(device):
            self.model = factory().to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = AdaFisher(self.model, lr=1e-4, preset=preset, backend="torch",
                                 weight_decay=1e-4)
        for p in self.model.parameters():
            p.grad = torch.randn_like(p).mul_(1e-3)
        fisher = self.opt.fisher
        fisher.buf.uniform_(0.1, 1.0)      # accumulators and row counts > 0: every layer updates
        # meta stays where the optimizer's step() puts it (a CPU tensor), so the kernels are timed
        # on exactly what they receive in training
        self.params, self.grads, self.moms, self.steps, self.meta, self.hyper = self.opt._gather()
        self.numel = sum(p.numel() for p in self.params)
        self.elsize = self.params[0].element_size()
