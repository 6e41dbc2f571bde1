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


def _inputs(attention, shape):
    """(query, key, value): one tensor three times, or a query and S = L + 2 keys (values the
    keys, or a tensor of their own)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(*shape, generator=g, dtype=D64)
    if attention == "self":
        return q, q, q
    kshape = list(shape)
    kshape[-2 if len(shape) == 3 and shape[0] == N and shape[1] == L else 0] += 2
    k = torch.randn(*kshape, generator=g, dtype=D64)
    return q, k, k if attention == "cross_kv" else torch.randn(*kshape, generator=g, dtype=D64)


@pytest.mark.parametrize("attention", ["self", "cross_kv", "cross"])
@pytest.mark.parametrize("kind", ["none", "causal_bool", "causal_hint", "float_2d", "bool_3d",
                                  "float_3d", "padding_bool", "padding_float",
                                  "causal_and_padding"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias,dropout", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_exposed_attention_computes_torch_attention(attention, kind, need_weights, average,
                                                    batch_first, batched, bias, dropout):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, batch_first=batch_first,
                                dtype=D64)
    exp = copy.deepcopy(ref)
    assert expose_attention(exp) == ["<root>"]
    s_len = L if attention == "self" else L + 2
    attn_mask, pad, causal = _masks(kind, batched, s_len)
    shape = ((N, L, E) if batch_first else (L, N, E)) if batched else (L, E)
    inputs = _inputs(attention, shape)
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


def test_which_projections_a_call_runs_as_modules():
    """Self-attention calls in_proj and out_proj; cross-attention only out_proj (NOTE: [exposed
    attention]); is_causal without attn_mask gets torch's own error."""
    torch.manual_seed(0)
    exp = nn.MultiheadAttention(E, H, dtype=D64)
    expose_attention(exp)
    calls = []
    exp.in_proj.register_forward_hook(lambda *a: calls.append("in_proj"))
    exp.out_proj.register_forward_hook(lambda *a: calls.append("out_proj"))
    q, kv = torch.randn(L, N, E, dtype=D64), torch.randn(L + 2, N, E, dtype=D64)
    exp(q, kv, kv)
    assert calls == ["out_proj"]
    calls.clear()
    exp(q, q, q)
    assert calls == ["in_proj", "out_proj"]
    with pytest.raises(RuntimeError, match="is_causal"):
        exp(q, q, q, is_causal=True)


def test_expose_attention_keeps_the_parameters_and_leaves_what_it_cannot_take():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dtype=D64),
                          nn.MultiheadAttention(E, H, kdim=4, vdim=4),
                          nn.MultiheadAttention(E, H, add_bias_kv=True))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"left 1 \(kdim/vdim\), 2 \(add_bias_kv\) as they are"):
        assert expose_attention(model) == ["0.self_attn"]
    assert type(model[0].self_attn) is ExposedMultiheadAttention
    assert type(model[1]) is type(model[2]) is nn.MultiheadAttention
    sd = model.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], keys[k]) for k in keys)
    assert model[0].self_attn.in_proj.weight is model[0].self_attn.in_proj_weight
    assert list(model[0].self_attn.in_proj.parameters()) == []
    clone = copy.deepcopy(model)          # the copy's in_proj reads the copy's parameters
    assert clone[0].self_attn.in_proj.weight is clone[0].self_attn.in_proj_weight
    with pytest.warns(UserWarning, match=r"left 1 \(kdim/vdim\), 2"):
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


class Net(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.head = nn.Linear(E, 3, dtype=D64)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0] if isinstance(self.attn, nn.MultiheadAttention) \
            else self.attn(x)
        return self.head(torch.tanh(h)).mean(1)


def _pair():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=D64)
    exposed, oracle = Net(copy.deepcopy(mha)), Net(LinearAttention(mha))
    oracle.head.load_state_dict(exposed.head.state_dict())
    expose_attention(exposed)
    return exposed, oracle


def _train(model, opt, steps, dev="cpu", dtype=D64):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(N, L, E, generator=g, dtype=dtype).to(dev)
        y = torch.randint(0, 3, (N,), generator=g).to(dev)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_exposed_attention_trains_as_attention_of_linear_layers(preset, cls):
    exposed, oracle = _pair()
    opts = []
    for model in (oracle, exposed):
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # nothing factor-free, no silent layer
            opts.append(cls(model, lr=1e-2, weight_decay=1e-2, TCov=2, preset=preset,
                            backend="torch"))
            _train(model, opts[-1], 5)
    a, b = oracle.attn, exposed.attn
    assert [lay.name for lay in opts[1].fisher.layers] == ["attn.out_proj", "attn.in_proj", "head"]
    assert opts[1].fisher.counters[:, 0].tolist() == [3, 3, 3]
    for want, got in ((a.in_proj.weight, b.in_proj_weight), (a.in_proj.bias, b.in_proj_bias),
                      (a.out_proj.weight, b.out_proj.weight), (oracle.head.weight, exposed.head.weight)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    for name in ("state", "fac"):
        torch.testing.assert_close(getattr(opts[1].fisher, name), getattr(opts[0].fisher, name),
                                   rtol=1e-11, atol=1e-13)


def test_exposed_attention_on_the_kernel_backends(kernel_ops):
    exposed, _ = _pair()
    exposed = exposed.to(device(), torch.float32)
    opt = AdaFisherW(exposed, lr=1e-2, TCov=1, preset="paper", backend=backend_name(kernel_ops),
                     check=True)
    _train(exposed, opt, 2, device(), torch.float32)
    assert opt.fisher.counters[:, 0].tolist() == [2, 2, 2]


# float32 under inductor: torch 2.11's inductor fails the CPU backward of a float64
# scaled_dot_product_attention ("expected scalar type Double but found Float"), package or not
@pytest.mark.parametrize("compiler,dtype,tol", [("aot_eager", D64, 1e-9),
                                                ("inductor", torch.float32, 1e-4)])
def test_exposed_attention_compiles_without_graph_breaks(compiler, dtype, tol):
    """A compiled model (fullgraph=True) trains as the eager one: the in_proj child and out_proj
    hooks compile with the attention."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (False, True):
        model = _pair()[0].to(dtype)
        opt = AdaFisher(model, lr=1e-2, TCov=1, preset="paper", backend="torch")
        fwd = torch.compile(model, fullgraph=True, backend=compiler) if compiled else model
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(N, L, E, generator=g, dtype=dtype)
            opt.zero_grad()
            fwd(x).square().mean().backward()
            opt.step()
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


def test_a_decoder_layer_preconditions_all_but_the_cross_attention_in_projection(recwarn):
    """nn.TransformerDecoderLayer, exposed: self-attention's in_proj and out_proj and the cross-
    attention's out_proj gather statistics; the cross-attention's in_proj is named as silent."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True,
                                       dtype=D64)
    assert expose_attention(layer) == ["self_attn", "multihead_attn"]
    opt = AdaFisher(layer, TCov=1, preset="paper", backend="torch")
    tgt, memory = torch.randn(N, L, E, dtype=D64), torch.randn(N, L + 2, E, dtype=D64)
    layer(tgt, memory).square().mean().backward()
    opt.step()
    iters = {n: d["stat_iters"] for n, d in opt.diagnostics().items()}
    assert iters.pop("multihead_attn.in_proj") == 0
    assert set(iters.values()) == {1} and "multihead_attn.out_proj" in iters
    (w,) = [str(r.message) for r in recwarn.list]
    assert "layer(s) multihead_attn.in_proj got gradients" in w
