"""Models for the benchmarks (torchvision is not a dependency): ResNet-18 (CIFAR variant),
ResNet-50 (ImageNet, torchvision v1.5 layout: stride on the 3x3 conv) and a small GPT.

``conv_layers(model, input_shape)`` lists every Conv2d of a model with the shape of its input,
found by running the model on the ``meta`` device (no memory, no compute): the kernel benchmarks
take their conv shapes from here rather than from a hand-written table.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, w: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != w:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, w: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, 4 * w, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * w:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * w, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * w))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """ResNet; ``cifar=True``: 3x3 stem, no max-pool (the usual CIFAR ResNet-18 of the AdaFisher
    paper's experiments); ``cifar=False``: 7x7/2 stem and 3x3/2 max-pool (ImageNet)."""

    def __init__(self, block, blocks, num_classes: int = 10, cifar: bool = True, width: int = 64):
        super().__init__()
        self.cifar = cifar
        if cifar:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            w = width * 2 ** i
            for j in range(n):
                layers.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.cifar:
            x = F.max_pool2d(x, 3, 2, 1)
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, cifar=True, width=width)


def resnet50(num_classes: int = 1000, width: int = 64) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, cifar=False, width=width)


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2 style decoder (pre-LN, learned positions, untied head)."""

    def __init__(self, vocab: int = 8192, d: int = 512, n_layer: int = 4, n_head: int = 8,
                 block_size: int = 256, tie: bool = False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.Sequential(*[Block(d, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.blocks(self.wte(idx) + self.wpe(pos))
        return self.head(self.ln_f(x))


def gpt2_small() -> GPT:
    """GPT-2 small: 124M parameters (tied head)."""
    return GPT(vocab=50257, d=768, n_layer=12, n_head=12, block_size=1024, tie=True)


def gpt_1b() -> GPT:
    """A GPT-2-shaped 1.1B-parameter model (d=2048, 20 layers, tied head)."""
    return GPT(vocab=50257, d=2048, n_layer=20, n_head=16, block_size=1024, tie=True)


def conv_layers(model: nn.Module, input_shape) -> List[Tuple[str, nn.Conv2d, Tuple[int, ...]]]:
    """[(name, conv module, input shape)] of every Conv2d in call order, by a forward pass on the
    meta device (the model is moved to meta: pass a throw-away instance)."""
    model = model.to("meta")
    found, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: found.append((name, mod, tuple(inp[0].shape)))))
    with torch.no_grad():
        model(torch.empty(input_shape, device="meta"))
    for h in handles:
        h.remove()
    return found
