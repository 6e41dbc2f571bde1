"""embedding_stats kernels against the torch reference."""
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
