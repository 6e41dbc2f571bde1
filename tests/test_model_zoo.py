"""Model code written the way vision libraries write it, end to end on every backend.

* An EfficientNet built like timm's: "SAME"-padding convs that pad inside forward (NOTE: [padding
  inside forward]), BatchNorm layers that apply their activation as submodules (NOTE: [composite
  layers]), depthwise convs, squeeze-excitation convs on pooled 1x1 maps, residuals, dropout.
* A ConvNeXt stage: LayerNorm2d on channels-first maps (NOTE: [channels-first LayerNorm]), a 7x7
  depthwise conv, Linear layers on channels-last views, a layer-scale parameter (factor-free).
* A UNet: GroupNorm, strided convs down, transposed convs up (NOTE: [transposed conv], paper
  preset), skip concatenations.
* A ViT: a conv patch embedding, class token and position parameters (factor-free),
  nn.TransformerEncoderLayer, whose attention uses its out_proj weight without calling the module
  (NOTE: [silent layers]: it gathers nothing and keeps F = 1 + Lambda); and the same with its
  attention exposed (NOTE: [exposed attention]), whose projections gather statistics.
* A LLaMA-style decoder: RMSNorm, bias-free attention projections, a SwiGLU MLP, rotary position
  mixing, and an output head tied to the embedding (NOTE: [shared parameters]); and the same
  fine-tuned with peft-style LoRA adapters, everything else frozen.
* Hugging Face's GPT-2: Conv1D projections (a Linear with its weight stored (in, out), found by
  name), learned positions, an output head tied to the token embedding.
Each piece has its exact test elsewhere; here they run together, with check=True holding every
statistics call and step of the kernel backends to the torch reference (issue 3 item 6).
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adafisher_fast import AdaFisherW, expose_attention
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


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: normalises dim 1 of (B, C, H, W)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + (self.gamma * self.fc2(F.gelu(self.fc1(h)))).permute(0, 3, 1, 2)


def convnext():
    return nn.Sequential(nn.Conv2d(3, 8, 2, 2), LayerNorm2d(8), ConvNeXtBlock(8), LayerNorm2d(8),
                         nn.Conv2d(8, 12, 2, 2), ConvNeXtBlock(12), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 5))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        block = lambda cin, cout: nn.Sequential(                                  # noqa: E731
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(2, cout), nn.SiLU())
        self.enc1, self.down, self.enc2 = block(3, 8), nn.Conv2d(8, 8, 3, 2, 1), block(8, 16)
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.dec = block(16, 8)
        self.out = nn.ConvTranspose2d(8, 5, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        h = self.up(self.enc2(self.down(e1)))
        return self.out(self.dec(torch.cat([h, e1], 1))).mean((2, 3))


class ViT(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls, self.pos = nn.Parameter(torch.zeros(1, 1, d)), nn.Parameter(torch.zeros(1, 7, d))
        self.encoder = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True,
                                                  norm_first=True)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)                     # (B, 6, d)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


class LlamaBlock(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = (nn.Linear(d, 2 * d, bias=False),
                                         nn.Linear(d, 2 * d, bias=False),
                                         nn.Linear(2 * d, d, bias=False))

    def rotate(self, t):
        b, n, d = t.shape
        t = t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        ang = torch.arange(n, device=t.device)[:, None] * 0.1 * torch.arange(
            1, t.shape[-1] // 2 + 1, device=t.device)
        cos, sin = ang.cos(), ang.sin()
        t1, t2 = t.chunk(2, -1)
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1)

    def forward(self, x):
        h = self.attn_norm(x)
        q, k = self.rotate(self.q(h)), self.rotate(self.k(h))
        v = self.v(h).view(q.shape[0], -1, self.heads, q.shape[-1]).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(x.shape))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, vocab=5, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(LlamaBlock(d), LlamaBlock(d))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(self.norm(self.blocks(self.embed(idx)))).mean(1)


class LoraLinear(nn.Module):
    """peft's LoRA Linear: the frozen base layer plus scaling * B(A(dropout(x))), with A and B in
    ModuleDicts keyed by adapter name and B starting at zero."""

    def __init__(self, base, r=2, alpha=4):
        super().__init__()
        self.base_layer = base
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(0.1)})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)
        self.scaling = alpha / r

    def forward(self, x):
        lora = self.lora_B["default"](self.lora_A["default"](self.lora_dropout["default"](x)))
        return self.base_layer(x) + lora * self.scaling


def llama_lora():
    """The LLaMA decoder fine-tuned as peft does by default: every weight frozen, LoRA adapters on
    the q and v projections; only the adapters' Linear layers are hooked."""
    model = Llama()
    model.requires_grad_(False)
    for blk in model.blocks:
        blk.q, blk.v = LoraLinear(blk.q), LoraLinear(blk.v)
    return model


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D (found by name, layers.HFConv1DKind): x @ weight + bias,
    weight (nx, nf)."""
    __module__ = "transformers.pytorch_utils"

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.reshape(*x.shape[:-1], self.nf)


class GPT2Block(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(d, dim=2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """Hugging Face's GPT-2: Conv1D projections, learned positions, a head tied to wte."""

    def __init__(self, vocab=5, d=16, n_pos=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_pos, d)
        self.h = nn.Sequential(GPT2Block(d), GPT2Block(d))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self.ln_f(self.h(self.wte(idx) + self.wpe(pos)))).mean(1)


def vit_exposed():
    """The ViT with its attention exposed (NOTE: [exposed attention]): in_proj and out_proj are
    hooked Linear layers that gather statistics."""
    model = ViT()
    expose_attention(model)
    return model


def _images(g):
    return torch.randn(3, 3, 12, 10, generator=g)


def _tokens(g):
    return torch.randint(0, 5, (3, 6), generator=g)


# model, its input, hooked layers under (official, paper): the released code hooks Conv2d,
# BatchNorm2d, LayerNorm and Linear only
MODELS = {"efficientnet": (efficientnet, _images, (19, 19)),
          "convnext": (convnext, _images, (14, 14)), "unet": (UNet, _images, (4, 9)),
          "vit": (ViT, _images, (8, 8)), "vit_exposed": (vit_exposed, _images, (9, 9)),
          "llama": (Llama, _tokens, (15, 20)),
          "llama_lora": (llama_lora, _tokens, (8, 8)), "gpt2": (GPT2, _tokens, (14, 15))}


@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_on_every_backend(name, backend, preset, monkeypatch):
    if backend != "torch":
        kernel_module(backend, monkeypatch)
    make, inputs, hooked = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # composite, padding and factor-free warnings
        opt = AdaFisherW(model, lr=1e-3, weight_decay=1e-2, TCov=1, preset=preset,
                         backend=backend, check=backend != "torch")
        g = torch.Generator().manual_seed(1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(2):
            x = inputs(g).to(device())
            y = torch.randint(0, 5, (3,), generator=g).to(device())
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert len(opt.fisher.layers) == hooked[preset == "paper"]
    assert {n: d["stat_iters"] for n, d in opt.diagnostics().items()} == \
        {lay.name: 0 if lay.name.endswith("out_proj") and name == "vit" else 2
         for lay in opt.fisher.layers}
    for n, p in model.named_parameters():           # trained, or frozen and untouched
        assert torch.isfinite(p).all() and torch.equal(p, before[n]) != p.requires_grad, n
