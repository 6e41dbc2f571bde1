"""Every Triton kernel, at every launch configuration the launchers pick for the GPU tests' and the
benchmarks' shapes and dtypes, compiles to an sm_80 and an sm_90 cubin -- on this CPU-only machine
(tests/triton_codegen.py; the interpreter alone would not catch what only the compiler rejects)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHED = {"_column_reduce_kernel", "_lattice_sum_kernel", "_row_moments_kernel",
            "_embedding_stats_kernel", "_layer_ema_kernel", "_fused_step_kernel",
            "_combine_moments_kernel", "_channel_rows_kernel"}


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "codegen.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_codegen.py"), "--arch", "80",
                           "--arch", "90", "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)     # ~70 s cold on 2 cores; below pytest.ini's
                                                       # faulthandler_timeout, which orphans it
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kernel"] for r in rows} == LAUNCHED
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["registers"] <= 255 and r["shared"] >= 0
    # vector loads wherever the data allows them (SPEC 8's bandwidth targets; launches compiled
    # with the JIT's own alignment specialisation): the fused step's aligned path, 16 bytes; the
    # column reduction of an aligned x, 16 or 8 bytes as its contiguous axis allows: K when B == 1
    # (a Linear's rows, NOTE: [contiguous K]), else B, whose power-of-two factor B_DIV the kernel
    # is given (NOTE: [plane alignment]; fisher_kernels/linear_stats.py)
    step = [r for r in rows if r["kernel"] == "_fused_step_kernel" and r["constexprs"]["ALIGNED"] == "True"]
    assert step and all(r["ld"].get("v4", 0) >= 3 and r["st"].get("v4", 0) >= 2 for r in step), step
    assert {r["constexprs"]["LR_PTRS"] for r in step} == {"True", "False"}    # a tensor lr too
    # the step's 256-thread programs fit 4 an SM (float32 parameters) or 3 (16-bit), as csrc's
    # blocks (NOTE: [chunk size] in fused_step.py)
    bound = {"fp32": 64, "bf16": 80, "fp16": 80}
    wide = [(r["arch"], r["constexprs"], r["registers"]) for r in rows
            if r["kernel"] == "_fused_step_kernel"
            and (r["num_warps"] != 8 or r["registers"] > bound[r["constexprs"]["P_DTYPE"]])]
    assert not wide, wide

    def allowed(r) -> int:
        c = r["constexprs"]
        if "x_ptr" not in r["aligned"]:
            return 0
        if c.get("B_Q") == "1" and c["B_DIV"] == "1":
            return 16 if "K" in r["aligned"] else 0
        return min(16, int(c["B_DIV"]) * {"*fp32": 4, "*bf16": 2, "*fp16": 2}[r["signature"]["x_ptr"]])

    reduce = [(allowed(r), r) for r in rows if r["kernel"] == "_column_reduce_kernel"]
    assert {16, 8} <= {w for w, _ in reduce}
    narrow = [(w, r["constexprs"], r["ld"]) for w, r in reduce
              if (w == 16 and "v4" not in r["ld"]) or (w == 8 and not {"v2", "v4"} & set(r["ld"]))]
    assert not narrow, narrow
    # IEEE division and square roots only, as the interpreter that runs the CPU tests computes
    # them (NOTE: [ieee rounding] in fisher_kernels/__init__.py)
    approx = [(r["kernel"], r["arch"], r["approx"]) for r in rows if r["approx"]]
    assert not approx, approx
    # every launch chooses FMA contraction (triton 3.9 warns where one does not), and the two
    # elementwise kernels round each multiply and add as the reference does (NOTE: [fp fusion])
    assert "TRITON_DEFAULT_FP_FUSION" not in proc.stdout + proc.stderr
    exact = [r for r in rows if r["kernel"] in ("_fused_step_kernel", "_layer_ema_kernel")]
    assert exact and all(r["fma"] == 0 for r in exact), [(r["kernel"], r["fma"]) for r in exact]
    assert any(r["fma"] for r in rows if r["kernel"] == "_column_reduce_kernel")
    # sums that no program reads back add with relaxed atomics (a plain reduction, red, on
    # triton 3.9; 3.6 keeps atom); the step's ticket alone orders (NOTE: [relaxed atomics] in
    # linear_stats.py, [step tickets] in fused_step.py)
    ordered = {(r["kernel"], k) for r in rows for k in r["atomics"] if not k.endswith(".relaxed")}
    assert ordered == {("_fused_step_kernel", "atom.release"),
                       ("_fused_step_kernel", "atom.acquire")}
    # the hot kernels stream memory, and layer_ema's latency-bound loops (NOTE: [ema block]) hold
    # 4 entries per thread: no spills to local memory; nor to the stack inside a loop for the
    # streaming ones (the step with its counts on the device, as the optimizer keeps them for the
    # kernels). Outside the loops a few bytes may go there once a thread (triton 3.8, which torch
    # 2.14 installs: the 16-bit step's tail, 8 B). layer_ema's official-preset walk may spill
    # more: ptxas gives a 256-thread kernel 128 registers, and its values kept across the walks
    # go to the stack at the turns of its loop over a layer's factors, not in the walks over
    # their entries (sm_90, triton 3.9: 56 B, 22 accesses)
    hot = [r for r in rows
           if r["kernel"] in ("_fused_step_kernel", "_column_reduce_kernel", "_layer_ema_kernel")]
    assert hot and all(r["local_bytes"] == 0 for r in hot), [r for r in hot if r["local_bytes"]]
    streaming = [r for r in hot if r["kernel"] == "_column_reduce_kernel"
                 or r["constexprs"].get("DEVICE_STEPS") == "True"]
    assert streaming and all(r["loop_spills"] == 0 for r in streaming), \
        [r for r in streaming if r["loop_spills"]]


def test_loop_spills_counts_local_accesses_inside_loops_only():
    from triton_codegen import _loop_spills
    sass = """
        /*0000*/                   STL.64 [R1], R4 ;                  /* 0x0 */
        /*0010*/                   IMAD R2, R3, R4, RZ ;              /* 0x0 */
        /*0020*/               @P1 STL [R1+0x8], R2 ;                 /* 0x0 */
        /*0030*/                   CALL.REL.NOINC 0x0090 ;            /* 0x0 */
        /*0040*/              @!P0 BRA 0x0020 ;                       /* 0x0 */
        /*0050*/                   LDL.LU.64 R4, [R1] ;               /* 0x0 */
        /*0060*/                   BRA 0x0080 ;                       /* 0x0 */
        /*0070*/                   EXIT ;                             /* 0x0 */
        /*0080*/                   LDL R6, [R1+0x8] ;                 /* 0x0 */
        /*0090*/                   LDL R7, [R1+0xc] ;                 /* 0x0 */
        /*00a0*/                   RET.REL.NODEC R20 0x0 ;            /* 0x0 */
        /*00b0*/                   STL [R1+0x10], R7 ;                /* 0x0 */
    """
    # in the loop 0x20-0x40: the predicated STL at 0x20; in the subroutine it calls (0x90 up to
    # its RET): the LDL at 0x90.  Not: the prologue's STL, the tail's LDLs, what follows the RET
    # (forward branches make no loop)
    assert _loop_spills(sass) == 2
    assert _loop_spills(sass.replace("@!P0 BRA 0x0020", "@!P0 BRA 0x0070")) == 0


def test_a_grid_past_cudas_limits_is_refused():
    """What the launchers' recorded launches are checked against (the interpreter runs any grid)."""
    from triton_codegen import check_grid
    check_grid("k", (2 ** 31 - 1, 65535, 65535))
    check_grid("k", (0,))
    for grid in ((2 ** 31,), (1, 65536), (1, 1, 65536), (1, 1, 1, 1)):
        with pytest.raises(ValueError, match=r"k: grid \(.*\) is past CUDA's"):
            check_grid("k", grid)
