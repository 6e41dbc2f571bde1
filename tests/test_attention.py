"""expose_attention (NOTE: [exposed attention]): nn.MultiheadAttention with its projections as
module calls.

The oracles: torch's own nn.MultiheadAttention for the forward (outputs, attention weights and
every gradient, float64, over its masks and options), and for training, attention written with
nn.Linear modules, whose in- and out-projections the built-in Linear kind preconditions.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adafisher_fast import AdaFisher, AdaFisherW, expose_attention
from adafisher_fast.attention import ExposedMultiheadAttention
from conftest import backend_name, device
from oracle import factors

D64 = torch.float64
E, H, L, N = 8, 2, 5, 3


def _masks(kind, batched, s_len):
    """(attn_mask, key_padding_mask, is_causal) of one case, for S = s_len keys."""
    g = torch.Generator().manual_seed(3)
    n = N if batched else 1
    causal = torch.ones(L, s_len, dtype=torch.bool).triu(1)
    pad = torch.zeros(n, s_len, dtype=torch.bool)
    pad[0, -2:] = True                                   # the first sequence is shorter
    pad = pad if batched else pad[0]
    noise = torch.randn(n * H, L, s_len, generator=g, dtype=D64)
    return {"none": (None, None, False),
            "causal_bool": (causal, None, False),
            "causal_hint": (causal, None, True),
            "float_2d": (noise[0], None, False),
            "bool_3d": (noise > 0.8, None, False),
            "float_3d": (noise, None, False),
            "padding_bool": (None, pad, False),
            "padding_float": (None, pad.to(D64).masked_fill(pad, -1e4), False),
            "causal_and_padding": (causal, pad, True)}[kind]


def _inputs(attention, shape, kdim=E, vdim=E):
    """(query, key, value): one tensor three times, or a query and S = L + 2 keys of kdim
    features (values the keys, or a tensor of their own with vdim)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(*shape, generator=g, dtype=D64)
    if attention == "self":
        return q, q, q
    kshape = list(shape)
    kshape[-2 if len(shape) == 3 and shape[0] == N and shape[1] == L else 0] += 2
    k = torch.randn(*kshape[:-1], kdim, generator=g, dtype=D64)
    return q, k, k if attention == "cross_kv" else torch.randn(*kshape[:-1], vdim, generator=g,
                                                               dtype=D64)


def _check_torch_attention(ref, attention, kind, need_weights, average, batch_first, batched):
    """The exposed copy of ``ref`` computes what ``ref`` computes: outputs, attention weights and
    the gradients of the inputs and every parameter, float64."""
    exp = copy.deepcopy(ref)
    assert expose_attention(exp) == ["<root>"]
    s_len = L if attention == "self" else L + 2
    attn_mask, pad, causal = _masks(kind, batched, s_len)
    shape = ((N, L, E) if batch_first else (L, N, E)) if batched else (L, E)
    inputs = _inputs(attention, shape, ref.kdim, ref.vdim)
    outs = []
    for m in (ref, exp):
        leaves = {id(t): t.clone().requires_grad_() for t in inputs}
        q, k, v = (leaves[id(t)] for t in inputs)             # the same tensor stays the same
        torch.manual_seed(7)                              # the same dropout draws
        out, w = m(q, k, v, key_padding_mask=pad, need_weights=need_weights, attn_mask=attn_mask,
                   average_attn_weights=average, is_causal=causal)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=D64)
                                     .reshape(out.shape)).nansum(),
                                    [*leaves.values(), *m.parameters()])
        outs.append((out, w, grads))
    (o1, w1, g1), (o2, w2, g2) = outs
    torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-13, equal_nan=True)
    assert (w1 is None) == (w2 is None) == (not need_weights)
    if need_weights:
        torch.testing.assert_close(w2, w1, rtol=1e-12, atol=1e-13, equal_nan=True)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, equal_nan=True)


KINDS = ["none", "causal_bool", "causal_hint", "float_2d", "bool_3d", "float_3d", "padding_bool",
         "padding_float", "causal_and_padding"]
WEIGHTS = [(False, True), (True, True), (True, False)]


@pytest.mark.parametrize("attention", ["self", "cross_kv", "cross"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("need_weights,average", WEIGHTS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias,dropout", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_exposed_attention_computes_torch_attention(attention, kind, need_weights, average,
                                                    batch_first, batched, bias, dropout):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, batch_first=batch_first,
                                dtype=D64)
    _check_torch_attention(ref, attention, kind, need_weights, average, batch_first, batched)


@pytest.mark.parametrize("options,attention", [
    (dict(kdim=4, vdim=4), "cross_kv"), (dict(kdim=4, vdim=6), "cross"),
    (dict(kdim=4, vdim=6, bias=False), "cross"), (dict(add_bias_kv=True), "self"),
    (dict(add_bias_kv=True), "cross"), (dict(add_zero_attn=True), "self"),
    (dict(add_zero_attn=True, add_bias_kv=True, kdim=4, vdim=6), "cross")])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("need_weights,average", WEIGHTS)
@pytest.mark.parametrize("batched", [True, False])
def test_exposed_attention_computes_torch_attention_with_its_options(options, attention, kind,
                                                                     need_weights, average,
                                                                     batched):
    """Separate q/k/v weights (kdim/vdim), a learned key and value (add_bias_kv) and a zero one
    (add_zero_attn), which lengthen every mask by a column that is not masked."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True, dtype=D64, **options)
    _check_torch_attention(ref, attention, kind, need_weights, average, True, batched)


def test_which_projections_a_call_runs_as_modules():
    """Self-attention calls in_proj and out_proj; cross-attention in_proj_q, in_proj_k, in_proj_v
    and out_proj (NOTE: [exposed attention]); is_causal without attn_mask gets torch's error, and
    a forward without autograd torch's forward."""
    torch.manual_seed(0)
    exp = nn.MultiheadAttention(E, H, dtype=D64)
    expose_attention(exp)
    calls = []
    for name in ("in_proj", "in_proj_q", "in_proj_k", "in_proj_v", "out_proj"):
        getattr(exp, name).register_forward_hook(lambda *a, name=name: calls.append(name))
    q, kv = torch.randn(L, N, E, dtype=D64), torch.randn(L + 2, N, E, dtype=D64)
    outs = []
    exp(q, kv, kv)
    assert calls == ["in_proj_q", "in_proj_k", "in_proj_v", "out_proj"]
    calls.clear()
    exp(q, q, q)
    assert calls == ["in_proj", "out_proj"]
    with pytest.raises(RuntimeError, match="is_causal"):
        exp(q, q, q, is_causal=True)
    calls.clear()
    ref = copy.deepcopy(exp)
    ref.__class__ = nn.MultiheadAttention
    with torch.no_grad():           # no statistics: torch's forward, bit for bit
        for m in (exp.eval(), ref.eval()):
            torch.manual_seed(7)
            outs.append(m(q, kv, kv))
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(*outs))


def test_expose_attention_keeps_the_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dtype=D64),
                          nn.MultiheadAttention(E, H, kdim=4, vdim=6),
                          nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert expose_attention(model) == ["0.self_attn", "1", "2"]
    assert type(model[0].self_attn) is type(model[1]) is type(model[2]) is ExposedMultiheadAttention
    sd = model.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], keys[k]) for k in keys)
    attn = model[0].self_attn
    assert attn.in_proj.weight is attn.in_proj_q.weight is attn.in_proj_weight
    assert model[1].in_proj_k.k_proj_weight is model[1].k_proj_weight
    assert list(attn.in_proj.parameters()) == list(attn.in_proj_v.parameters()) == []
    clone = copy.deepcopy(model)          # the copy's projections read the copy's parameters
    assert clone[0].self_attn.in_proj_k.weight is clone[0].self_attn.in_proj_weight
    assert clone[1].in_proj_v.v_proj_weight is clone[1].v_proj_weight
    assert expose_attention(model) == []              # twice is once


class LinearAttention(nn.Module):
    """The oracle: self-attention written with nn.Linear modules (in_proj (3E, E), out_proj)."""

    def __init__(self, mha):
        super().__init__()
        self.out_proj = nn.Linear(E, E, dtype=D64)       # in the exposed module's order
        self.in_proj = nn.Linear(E, 3 * E, dtype=D64)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, x):                                  # (N, L, E)
        q, k, v = (t.reshape(N, L, H, E // H).transpose(1, 2)
                   for t in self.in_proj(x).chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // H), -1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(N * L, E)).reshape(N, L, E)


class ConvCrossAttention(nn.Module):
    """The oracle of cross-attention's factors: the q/k/v projections as one 1x1 Conv1d with
    three groups over query, key and value stacked as channels (equal lengths), whose factors
    under preset="paper" are H = [H_q, 1, H_k, 1, H_v, 1] and S by output row."""

    def __init__(self, mha):
        super().__init__()
        self.out_proj = nn.Linear(E, E, dtype=D64)       # in the exposed module's order
        self.in_proj = nn.Conv1d(3 * E, 3 * E, 1, groups=3, dtype=D64)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight[..., None])
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value):                  # (N, L, E) each
        qkv = self.in_proj(torch.cat([query, key, value], -1).transpose(1, 2)).transpose(1, 2)
        q, k, v = (t.reshape(N, L, H, E // H).transpose(1, 2) for t in qkv.chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // H), -1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(N * L, E)).reshape(N, L, E)


class Net(nn.Module):
    """A head on self-attention (one input) or cross-attention (query, key and value)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.head = nn.Linear(E, 3, dtype=D64)

    def forward(self, *inputs):
        if isinstance(self.attn, nn.MultiheadAttention):
            h = self.attn(*(inputs * 3 if len(inputs) == 1 else inputs), need_weights=False)[0]
        else:
            h = self.attn(*inputs)
        return self.head(torch.tanh(h)).mean(1)


def _pair(cross=False):
    """(exposed, oracle): Nets on one nn.MultiheadAttention, exposed, and on its oracle: self-
    attention of Linear layers, or with ``cross`` cross-attention of a grouped convolution."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=D64)
    exposed = Net(copy.deepcopy(mha))
    oracle = Net((ConvCrossAttention if cross else LinearAttention)(mha))
    oracle.head.load_state_dict(exposed.head.state_dict())
    expose_attention(exposed)
    return exposed, oracle


def _train(model, opt, steps, cross=False, dev="cpu", dtype=D64):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(3 if cross else 1, N, L, E, generator=g, dtype=dtype).to(dev)
        y = torch.randint(0, 3, (N,), generator=g).to(dev)
        opt.zero_grad()
        F.cross_entropy(model(*x), y).backward()
        opt.step()


def _in_exposed_layout(h, cross):
    """The oracle's in_proj H as the exposed layer lays it out, [H_q, H_k, H_v, 1]: a Linear's
    [H, 1] with H once per block, or the grouped conv's [H_q, 1, H_k, 1, H_v, 1]."""
    if cross:
        return torch.cat([h.reshape(3, E + 1)[:, :E].reshape(-1), h[-1:]])
    return torch.cat([h[:E]] * 3 + [h[E:]])


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("cross,preset", [(False, "official"), (False, "paper"), (True, "paper")])
def test_exposed_attention_trains_as_its_oracle(cross, preset, cls):
    """Self-attention trains as attention of Linear layers (the q/k/v blocks of H equal); cross-
    attention, with query, key and value distinct, as projections by a grouped 1x1 convolution
    (NOTE: [exposed attention]), which only preset="paper" hooks."""
    exposed, oracle = _pair(cross)
    opts = []
    for model in (oracle, exposed):
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # nothing factor-free, no silent layer
            opts.append(cls(model, lr=1e-2, weight_decay=1e-2, TCov=2, preset=preset,
                            backend="torch"))
            _train(model, opts[-1], 5, cross)
    assert [lay.name for lay in opts[1].fisher.layers] == ["attn.out_proj", "attn.in_proj", "head"]
    assert opts[1].fisher.counters[:, 0].tolist() == [3, 3, 3]
    a, b = oracle.attn, exposed.attn
    for want, got in ((a.in_proj.weight.reshape(3 * E, E), b.in_proj_weight),
                      (a.in_proj.bias, b.in_proj_bias), (a.out_proj.weight, b.out_proj.weight),
                      (oracle.head.weight, exposed.head.weight)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    want, got = opts[0].ema_state(), opts[1].ema_state()
    h, s = want["attn.in_proj"]
    want["attn.in_proj"] = (_in_exposed_layout(h, cross), s)
    for name in want:
        for w, g in zip(want[name], got[name]):
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("cross", [False, True])
def test_exposed_attention_on_the_kernel_backends(kernel_ops, cross):
    exposed = _pair(cross)[0].to(device(), torch.float32)
    opt = AdaFisherW(exposed, lr=1e-2, TCov=1, preset="paper", backend=backend_name(kernel_ops),
                     check=True)
    _train(exposed, opt, 2, cross, device(), torch.float32)
    assert opt.fisher.counters[:, 0].tolist() == [2, 2, 2]


# float32 under inductor: torch 2.11's inductor fails the CPU backward of a float64
# scaled_dot_product_attention ("expected scalar type Double but found Float"), package or not
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("compiler,dtype,tol", [("aot_eager", D64, 1e-9),
                                                ("inductor", torch.float32, 1e-4)])
def test_exposed_attention_compiles_without_graph_breaks(compiler, dtype, tol, cross):
    """A compiled model (fullgraph=True) trains as the eager one: the projections' hooks compile
    with the attention, in cross-attention each call's output gradient in its own block."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (False, True):
        model = _pair(cross)[0].to(dtype)
        opt = AdaFisher(model, lr=1e-2, TCov=1, preset="paper", backend="torch")
        fwd = torch.compile(model, fullgraph=True, backend=compiler) if compiled else model
        _train(fwd, opt, 3, cross, dtype=dtype)
        runs.append((model, opt))
    assert counters["graph_break"] == {}
    (m1, o1), (m2, o2) = runs
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol / 1000)
    torch.testing.assert_close(o2.fisher.state, o1.fisher.state, rtol=tol, atol=tol / 1000)


def test_an_unexposed_attention_is_named_with_the_remedy(recwarn):
    """Without expose_attention, construction names the attention whose in_proj_weight has no
    factors and says what would precondition it; the first statistics step names its out_proj,
    which got gradients without being called (NOTE: [silent layers])."""
    torch.manual_seed(0)
    model = Net(nn.MultiheadAttention(E, H, batch_first=True, dtype=D64))
    opt = AdaFisher(model, TCov=1, preset="paper", backend="torch")
    (w,) = [str(r.message) for r in recwarn.list]
    assert "factors for the parameters of attn (MultiheadAttention):" in w
    assert "adafisher_fast.expose_attention(model), before making the optimizer, preconditions " \
           "attn (MultiheadAttention) (NOTE: [exposed attention])." in w and "register_layer" not in w
    recwarn.clear()
    _train(model, opt, 1)
    (w,) = [str(r.message) for r in recwarn.list]
    assert "layer(s) attn.out_proj got gradients" in w and "expose_attention" in w


def test_a_decoder_layer_preconditions_every_projection():
    """nn.TransformerDecoderLayer, exposed: self- and cross-attention projections all gather."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True,
                                       dtype=D64)
    assert expose_attention(layer) == ["self_attn", "multihead_attn"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # nothing factor-free, no silent layer
        opt = AdaFisher(layer, TCov=1, preset="paper", backend="torch")
        tgt, memory = torch.randn(N, L, E, dtype=D64), torch.randn(N, L + 2, E, dtype=D64)
        layer(tgt, memory).square().mean().backward()
        opt.step()
    iters = {n: d["stat_iters"] for n, d in opt.diagnostics().items()}
    assert "multihead_attn.in_proj" in iters and set(iters.values()) == {1}


def test_in_projection_statistics_are_each_inputs_means():
    """Two calls of different lengths and batch sizes before one step, kdim and vdim: H's q, k
    and v blocks are the means of their own inputs' squares, S's blocks of their projections'
    output gradients, each call's sums over its rows divided by its length, and the sum over
    calls divided by the number of sequences (NOTE: [exposed attention])."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, H, kdim=4, vdim=6, dtype=D64)
    expose_attention(attn)
    opt = AdaFisher(attn, TCov=1, preset="paper", backend="torch")
    outs = {}
    for name in ("in_proj_q", "in_proj_k", "in_proj_v"):
        def keep(mod, inp, out, name=name):
            out.retain_grad()
            outs.setdefault(name, []).append((inp[0], out))
        getattr(attn, name).register_forward_hook(keep)
    sums_h, sums_s, seqs = [0, 0, 0], [0, 0, 0], 0
    for n_q, n_k, n_b in ((L, L + 2, N), (L + 3, 2, 1)):
        q = torch.randn(n_q, n_b, E, dtype=D64)
        k, v = torch.randn(n_k, n_b, 4, dtype=D64), torch.randn(n_k, n_b, 6, dtype=D64)
        attn(q, k, v)[0].sin().sum().backward()
        for i, name in enumerate(("in_proj_q", "in_proj_k", "in_proj_v")):
            x, out = outs[name][-1]
            sums_h[i] = sums_h[i] + x.square().sum((0, 1)) / x.shape[0]
            sums_s[i] = sums_s[i] + out.grad.square().sum((0, 1)) / out.shape[0]
        seqs += n_b
    h, s = opt.raw_stats()["in_proj"]
    torch.testing.assert_close(h, torch.cat([torch.cat(sums_h) / seqs, torch.ones(1, dtype=D64)]),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s, torch.cat(sums_s) / seqs, rtol=1e-12, atol=1e-14)
    # the first step is p -= lr * g / F: each weight's F reads its own blocks of S' and H'
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in attn.named_parameters()}
    opt.step()
    hp, sp = factors(*opt.ema_state()["in_proj"], "paper")
    rows, cols = (sp[:E], sp[E:2 * E], sp[2 * E:]), (hp[:E], hp[E:E + 4], hp[E + 4:E + 10])
    for i, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
        p0, g = before[name]
        torch.testing.assert_close(1e-3 * g / (p0 - getattr(attn, name).detach()),
                                   rows[i][:, None] * cols[i][None, :] + 1e-3, rtol=1e-8, atol=0)


@pytest.mark.parametrize("case", ["padding_transposed", "mask_transposed", "padding_uint8",
                                  "mask_int64"])
def test_exposed_attention_refuses_the_masks_torch_refuses(case):
    """A mask torch's forward rejects (integer dtype, a transposed shape whose sizes fit) raised
    nowhere on the exposed path: an integer mask was added to the scores, a transposed one
    reshaped into place.  Now both raise the same exception type."""
    torch.manual_seed(0)
    n_e, n_l, n_s, n_b = 8, 4, 6, 2
    ref = nn.MultiheadAttention(n_e, 2, dtype=D64)
    exposed = copy.deepcopy(ref)
    expose_attention(exposed)
    q = torch.randn(n_l, n_b, n_e, dtype=D64, requires_grad=True)
    kv = torch.randn(n_s, n_b, n_e, dtype=D64)
    pad = torch.zeros(n_b, n_s, dtype=torch.bool)
    pad[0, -3:] = True
    kw = {"padding_transposed": dict(key_padding_mask=pad.t().contiguous()),
          "mask_transposed": dict(attn_mask=torch.rand(n_b * 2, n_s, n_l) > 0.7),
          "padding_uint8": dict(key_padding_mask=pad.to(torch.uint8)),
          "mask_int64": dict(attn_mask=(torch.rand(n_l, n_s) > 0.7).long())}[case]
    with pytest.raises((AssertionError, RuntimeError)) as want:
        ref(q, kv, kv, **kw)
    with pytest.raises(want.type):
        exposed(q, kv, kv, **kw)


def test_a_frozen_exposed_encoder_takes_torchs_fast_path():
    """Grad enabled but nothing requires it (a frozen encoder before a trained head, in eval
    mode with a padding mask, so the encoder passes nested tensors): torch's own forward runs,
    as in nn.MultiheadAttention (the exposed path crashed transposing a nested tensor)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2).eval()
    enc.requires_grad_(False)
    enc.layers[0].linear2.register_forward_hook(lambda m, i, o: None)   # no layer fast path
    exposed = copy.deepcopy(enc)
    expose_attention(exposed)
    src = torch.randn(3, 6, 8)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    torch.testing.assert_close(exposed(src, src_key_padding_mask=pad),
                               enc(src, src_key_padding_mask=pad))
