"""The interpreter's sanitizer (tests/triton_sanitizer.py, NOTE: [interpreter sanitizer]) catches
a kernel that reads, writes or adds past its tensors, whose programs race on an address, or whose
multiple_of / max_contiguous hints are false, and lets in-bounds, masked-off, atomic and
ticket-ordered accesses and true hints run."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import triton_sanitizer  # noqa: E402

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
    assert triton_sanitizer.span(col) == (m.data_ptr(), m.data_ptr() + 4 * 4)
    with pytest.raises(Exception, match="store of"):
        _copy_kernel[(1,)](torch.ones(8), col, 5, 0, MASKED=True, BLOCK=8)


@triton.jit
def _neighbour_kernel(x, out, MODE: tl.constexpr):
    """Program i: MODE 0 stores x[i] to out[0] (all programs, one address); 1 stores x[i] + 1 to
    x[i] after loading x[i + 1] (its neighbour's); 2 adds x[i] to out[0] atomically; 3 adds
    atomically, then loads out[0]; 4 loads out[0] first; 5 reads a count out[0], takes a ticket
    (out[1]) and stores the count to x[i], and the last to take one increments the count (NOTE:
    [step tickets]); 6 the same, reading the count after its ticket."""
    i = tl.program_id(0)
    n = tl.num_programs(0)
    if MODE == 0:
        tl.store(out, tl.load(x + i))
    elif MODE == 1:
        v = tl.load(x + (i + 1) % n)
        tl.store(x + i, v + 1.0)
    elif MODE == 2:
        tl.atomic_add(out, tl.load(x + i))
    elif MODE == 3:
        tl.atomic_add(out, tl.load(x + i))
        tl.store(out + 1 + i, tl.load(out))
    elif MODE == 4:
        tl.store(out + 1 + i, tl.load(out))
        tl.atomic_add(out, tl.load(x + i))
    else:
        if MODE == 5:
            t = tl.load(out)
        last = tl.atomic_add(out + 1, 1.0) == n - 1
        if MODE == 6:
            t = tl.load(out)
        tl.store(x + i, t)
        if last:
            tl.store(out, t + 1.0)


@pytest.mark.parametrize("mode, race", [
    (0, "1 addresses .* program 0 store, program 1 store, program 2 store"),
    (1, "3 addresses .* program 0 store, program 2 load"),       # x[0]: stored by 0, read by 2
    (4, "1 addresses .* program 0 atomic, program 0 load, program 1 atomic, program 1 load, "
        "program 2 atomic"),
    # after their atomics programs 0 and 1 read a sum that program 2 has yet to add to
    (3, "1 addresses .* program 0 atomic, program 0 load, program 1 atomic, program 1 load, "
        "program 2 atomic"),
    # a count read after the ticket: the last ticket-taker's increment may come first
    (6, "1 addresses .* program 0 load, program 1 load, program 2 load, program 2 store")])
def test_programs_that_race_are_caught(mode, race):
    with pytest.raises(triton_sanitizer.Race, match=f"_neighbour_kernel: {race}"):
        _neighbour_kernel[(3,)](torch.arange(1.0, 4.0), torch.zeros(4), MODE=mode)


def test_atomics_between_themselves_run():
    out = torch.zeros(4)
    _neighbour_kernel[(3,)](torch.arange(1.0, 4.0), out, MODE=2)
    assert out[0] == 6.0


def test_a_ticket_orders_what_the_last_program_does_after_it():
    """Every program reads the count before its ticket; the last one to take a ticket may then
    write it (NOTE: [step tickets])."""
    x, out = torch.full((3,), -1.0), torch.zeros(4)
    _neighbour_kernel[(3,)](x, out, MODE=5)
    assert x.tolist() == [0.0] * 3 and out[:2].tolist() == [1.0, 3.0]



@triton.jit
def _hinted_kernel(x, out, at, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Copies BLOCK floats from x + at to out through a hint: MODE 0 x 16-byte aligned, 1 ``at`` a
    multiple of BLOCK, 2 the offsets at + (0, 1, ..., BLOCK - 1) runs of BLOCK from a multiple of
    BLOCK, 3 the same said of at + (0, 2, 4, ...) (a stride-2 gather)."""
    start = tl.load(at + tl.program_id(0))
    i = tl.arange(0, BLOCK)
    if MODE == 0:
        x = tl.multiple_of(x, 16)
    if MODE == 1:
        start = tl.multiple_of(start, BLOCK)
    offs = start + i
    if MODE == 3:
        offs = start + 2 * i
    if MODE >= 2:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    tl.store(out + tl.program_id(0) * BLOCK + i, tl.load(x + offs))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_true_hints_run(mode):
    x = torch.arange(32.0)
    out = torch.zeros(16)
    _hinted_kernel[(2,)](x, out, torch.tensor([8, 16], dtype=torch.int32), MODE=mode, BLOCK=8)
    assert out.tolist() == list(range(8, 24))


@pytest.mark.parametrize("mode, bad", [
    (0, r"tl.multiple_of\(16\) on a value of \(1,\) addresses .* that is 0x[0-9a-f]*4\b"),
    (1, r"tl.multiple_of\(8\) on a value of \(1,\) entries .* that is 12 "),
    (2, r"tl.multiple_of\(8\) on a value of \(8,\) entries \(dim 0, runs of 8\) that is 12 "),
    (3, r"tl.max_contiguous\(8\) on a value of \(8,\) entries \(dim 0\) whose runs step by 2, not 1")])
def test_a_false_hint_is_caught(mode, bad):
    """What the compiled kernel would trust and the interpreter ignores: x 4 bytes past a 16-byte
    boundary, a second program's start of 12, not a multiple of 8, or offsets that skip."""
    x = torch.arange(64.0)[1 if mode == 0 else 0:]
    at = torch.tensor([8, 12 if mode in (1, 2) else 16], dtype=torch.int32)
    with pytest.raises(triton_sanitizer.BadHint, match=f"_hinted_kernel: {bad}"):
        _hinted_kernel[(2,)](x, torch.zeros(16), at, MODE=mode, BLOCK=8)
