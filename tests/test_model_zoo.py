"""Model code written the way vision libraries write it, end to end on every backend.

An EfficientNet built like timm's: "SAME"-padding convs that pad inside forward (NOTE: [padding
inside forward]), BatchNorm layers that apply their activation as submodules (NOTE: [composite
layers]), depthwise convs, squeeze-excitation convs on pooled 1x1 maps, residuals, dropout.  Each
piece has its exact test elsewhere; here they run together, with check=True holding every
statistics call and step of the kernel backends to the torch reference (issue 3 item 6).
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adafisher_fast import AdaFisherW
from conftest import device, kernel_backends, kernel_module


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow's "SAME" padding for each input size, then padding 0."""

    def forward(self, x):
        pads = []
        for size, k, st, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size),
                                  reversed(self.stride), reversed(self.dilation)):
            total = max((math.ceil(size / st) - 1) * st + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: batch_norm, then drop and act submodules."""

    def __init__(self, c, act=True):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = 4 * cin
        self.pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), BatchNormAct2d(mid)
        self.dw = Conv2dSame(mid, mid, 3, stride, groups=mid, bias=False)
        self.bn2, self.se = BatchNormAct2d(mid), SqueezeExcite(mid)
        self.pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), BatchNormAct2d(cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.bn3(self.pwl(self.se(self.bn2(self.dw(self.bn1(self.pw(x)))))))
        return h + x if self.residual else h


def efficientnet():
    return nn.Sequential(Conv2dSame(3, 8, 3, 2, bias=False), BatchNormAct2d(8), MBConv(8, 8, 1),
                         MBConv(8, 12, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                         nn.Linear(12, 5))


@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_efficientnet_trains_on_every_backend(backend, preset, monkeypatch):
    if backend != "torch":
        kernel_module(backend, monkeypatch)
    torch.manual_seed(0)
    model = efficientnet().to(device())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the composite-layer and padding warnings
        opt = AdaFisherW(model, lr=1e-3, weight_decay=1e-2, TCov=1, preset=preset,
                         backend=backend, check=backend != "torch")
        g = torch.Generator().manual_seed(1)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            x = torch.randn(3, 3, 13, 11, generator=g).to(device())
            y = torch.randint(0, 5, (3,), generator=g).to(device())
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    hooked = len(opt.fisher.layers)
    assert hooked == 19                         # every conv and norm layer, and the head
    assert [d["stat_iters"] for d in opt.diagnostics().values()] == [2] * hooked
    assert all(torch.isfinite(p).all() and not torch.equal(p, b)
               for p, b in zip(model.parameters(), before))
