"""The interpreter's bounds check (tests/triton_bounds.py, NOTE: [interpreter bounds]) catches a
kernel that reads, writes or adds past its tensors, and lets in-bounds and masked-off ones run."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import triton_bounds  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _copy_kernel(src, dst, n, extra, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst + i, tl.load(src + i, mask=i < n), mask=i < n + extra)
    else:
        tl.store(dst + i, tl.load(src + i))


@triton.jit
def _add_kernel(dst, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.atomic_add(dst + i, 1.0, mask=i <= n)


def test_in_bounds_and_masked_off_accesses_run():
    src, dst = torch.arange(5.0), torch.zeros(5)
    _copy_kernel[(1,)](src, dst, 5, 0, MASKED=True, BLOCK=8)     # lanes 5-7 masked off
    assert torch.equal(dst, src)


def test_a_store_past_the_end_is_caught_before_it_happens():
    src, buf = torch.arange(5.0), torch.zeros(8)
    with pytest.raises(Exception, match=r"_copy_kernel: store of 1 of 6 active addresses out "
                                        r"of bounds.*\+20 bytes from its start, \+0 from its end"):
        _copy_kernel[(1,)](src, buf[:5], 5, 1, MASKED=True, BLOCK=8)
    assert buf.eq(0).all(), "the store went ahead"


def test_an_unmasked_load_past_the_end_is_caught():
    src, dst = torch.arange(8.0)[:5], torch.zeros(8)
    with pytest.raises(Exception, match=r"_copy_kernel: load of 3 of 8 active addresses"):
        _copy_kernel[(1,)](src, dst, 5, 0, MASKED=False, BLOCK=8)


def test_an_atomic_past_the_end_is_caught():
    dst = torch.zeros(8)
    with pytest.raises(Exception, match=r"_add_kernel: atomic of 1 of 5 active addresses"):
        _add_kernel[(1,)](dst[:4], 4, BLOCK=8)
    assert dst.eq(0).all()


def test_a_view_bounds_its_kernel_not_its_storage():
    """dst is a column of a matrix: its span ends at its last element, so the row after it is
    out of bounds although its storage goes on."""
    m = torch.zeros(4, 3)
    col = m[:2, 0]
    assert triton_bounds.span(col) == (m.data_ptr(), m.data_ptr() + 4 * 4)
    with pytest.raises(Exception, match="store of"):
        _copy_kernel[(1,)](torch.ones(8), col, 5, 0, MASKED=True, BLOCK=8)
