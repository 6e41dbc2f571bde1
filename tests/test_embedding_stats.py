"""embedding_stats kernels against the torch reference."""
import importlib

import pytest
import torch

from adafisher_fast import reference
from conftest import device


@pytest.mark.parametrize("shape,vocab", [((1,), 1), ((7,), 13), ((3, 33), 7), ((2, 5, 13), 1031)])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_embedding_stats(kernel_ops, shape, vocab, idx_dtype):
    torch.manual_seed(0)
    idx = torch.randint(0, vocab, shape, device=device()).to(idx_dtype)
    want = torch.randint(0, 5, (vocab,), device=device()).float()   # integers: adds are exact
    got = want.clone()
    reference.embedding_stats(idx.long(), want)
    kernel_ops.embedding_stats(idx, got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_embedding_stats_counts_only_tokens_in_range(kernel_ops, idx_dtype):
    """Tokens outside [0, V) are not counted, by the reference and the kernels alike (an
    Embedding subclass may send them to another table, Idefics' decoupled embedding): the
    reference raised, the kernels skipped them."""
    tokens = [3, -1, 0, 9, 3, 11, -7, 8, 3, 0]
    want = torch.zeros(9, dtype=torch.float64)
    for t in tokens:
        if 0 <= t < 9:
            want[t] += 1
    idx = torch.tensor(tokens, dtype=idx_dtype, device=device()).reshape(2, 5)
    for ops in (reference, kernel_ops):
        got = torch.zeros(9, device=device())
        ops.embedding_stats(idx, got)
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=0)


def test_embedding_stats_rejects_indices_that_are_not_integers(kernel_ops):
    """A float idx was cast to token ids by the Triton kernel (soft tokens all counted as 0)."""
    for ops in (reference, kernel_ops):
        with pytest.raises((TypeError, RuntimeError), match="idx must be int"):
            ops.embedding_stats(torch.rand(4, device=device()), torch.zeros(4, device=device()))


def test_embedding_stats_empty(kernel_ops):
    out = torch.ones(4, device=device())
    kernel_ops.embedding_stats(torch.zeros(0, dtype=torch.int64, device=device()), out)
    assert torch.equal(out, torch.ones(4, device=device()))


@pytest.mark.gpu
def test_embedding_stats_gpu_large(kernel_ops):
    idx = torch.randint(0, 50257, (64, 1024), device="cuda")
    want = torch.zeros(50257, device="cuda")
    got = want.clone()
    reference.embedding_stats(idx, want)
    kernel_ops.embedding_stats(idx, got)
    assert torch.equal(got, want)


def test_triton_wide_offsets_count_as_the_reference(monkeypatch):
    """NOTE: [wide offsets] in fisher_kernels/linear_stats.py: the int64 path (forced), interpreted."""
    pytest.importorskip("triton")
    es = importlib.import_module("fisher_kernels.embedding_stats")
    monkeypatch.setattr(es, "WIDE_FROM", 0)
    idx = torch.randint(-2, 40, (3, 700))
    want, got = torch.zeros(37), torch.zeros(37)
    reference.embedding_stats(idx, want)
    es.embedding_stats(idx, got)
    assert torch.equal(got, want)
