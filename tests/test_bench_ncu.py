"""bench/ncu.py, the Nsight Compute driver of .ci/gpu's ``ncu`` stage: its default cases are SPEC 8's
shapes, its CPU run calls every op, and its table splits ncu's rows at the marker kernels
(NOTE: [profile markers]).  ncu itself runs only on the GPU machine."""
import importlib
import json
import re

import pytest
import torch

from adafisher_fast.backends import OPS
from bench import ncu
from bench.harness import Harness

HEADER = ("ID,Process ID,Process Name,Host Name,Kernel Name,Context,Stream,Block Size,Grid Size,Device,CC,"
          "dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,"
          "gpu__time_duration.sum,launch__block_size,launch__grid_size,launch__registers_per_thread,"
          "sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active")


def _row(i, name, read="", write="", dram="", ns="", sm=""):
    f = [str(i), "7", "python3", "127.0.0.1", name, "1", "7", "(256, 1, 1)", "(132, 1, 1)", "0", "9.0",
         read, write, dram, ns, "256", "132", "32", sm, "50"]
    return ",".join(f'"{v}"' for v in f)


def test_default_cases_are_spec8_shapes(tmp_path):
    """Every op selects at least one full-size case; conv's are exactly the two im2col anchors."""
    h = Harness(torch.device("cpu"), False, tmp_path, verbose=False)
    for op in OPS:
        cases = importlib.import_module(f"bench.bench_{op}").cases(h)
        chosen = [c for c in cases if re.search(ncu.DEFAULT_CASES[op], c.label)]
        assert chosen, op
        if op == "conv_stats":
            assert {c.label for c in chosen} == {c.label for c in cases if c.extra.get("anchor_im2col_ms")}
            assert len(chosen) == 2
        if op == "fused_step":
            assert [c.label for c in chosen] == ["gpt2-small 124M"]


def test_cpu_run_calls_every_op(tmp_path):
    assert ncu.main(["--device", "cpu", "--out", str(tmp_path), "--backends", "torch"]) == 0
    done = json.loads((tmp_path / "ncu_cases.json").read_text())
    assert [d["op"] for d in done] == list(OPS)
    assert all(d["backend"] == "torch" and d["bytes"] > 0 for d in done)


def test_table_splits_the_kernels_at_the_markers(tmp_path):
    cases = [{"op": "linear_stats", "case": "a", "backend": "cuda", "dtype": "float32", "bytes": 3e6},
             {"op": "fused_step", "case": "b", "backend": "triton", "dtype": "float32", "bytes": 1e6}]
    (tmp_path / "ncu_cases.json").write_text(json.dumps(cases))
    lines = ["==PROF== Connected to process 7 (/usr/bin/python3)", HEADER,
             '"","","","","","","","","","","","byte","byte","%","nsecond","","","register/thread","%","%"',
             _row(0, "spin_kernel(long)", ns="1,000"),
             _row(1, "void adafisher::reduce_rows_kernel<float, float>(const float *, float *)",
                  "2,000,000", "1,000", "85.5", "1,000", "12"),
             _row(2, "void adafisher::sum_partials_kernel<float>(const float *, float *)",
                  "4,000", "1,000", "3", "500", "1"),
             _row(3, "spin_kernel(long)", ns="1,000"),
             _row(4, "_fused_step_kernel", "600,000", "400,000", "90", "2,000", "20"),
             "==PROF== Disconnected from process 7"]
    (tmp_path / "ncu.csv").write_text("\n".join(lines) + "\n")
    assert ncu.main(["--table", str(tmp_path)]) == 0
    text = (tmp_path / "ncu.md").read_text()
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in text.splitlines()[2:]]
    assert [r[4] for r in rows] == ["adafisher::reduce_rows_kernel<float, float>",
                                    "adafisher::sum_partials_kernel<float>", "_fused_step_kernel"]
    # GB/s = bench bytes / the case's kernel time: 3e6 B / 1.5 us = 2000 GB/s; 1e6 B / 2 us = 500
    assert rows[0][:4] == ["linear_stats", "a", "cuda", "2000"] and rows[1][:4] == ["", "", "", ""]
    assert rows[2][:4] == ["fused_step", "b", "triton", "500"]
    # time us, DRAM %, SM %, occupancy %, DRAM MB (read + write), grid, block, regs
    assert rows[0][5:] == ["1", "85.5", "12", "50", "2", "132", "256", "32"]
    assert rows[2][5:] == ["2", "90", "20", "50", "1", "132", "256", "32"]


def test_table_refuses_files_of_different_runs(tmp_path):
    (tmp_path / "ncu_cases.json").write_text(json.dumps([{"op": "x", "case": "a", "backend": "cuda",
                                                          "dtype": "", "bytes": 1}] * 2))
    (tmp_path / "ncu.csv").write_text("\n".join([HEADER, _row(0, "spin_kernel(long)"), _row(1, "k")]))
    with pytest.raises(ValueError, match="1 marker kernels .* 2 cases"):
        ncu.table(tmp_path)


def test_a_failing_case_keeps_the_markers_aligned(tmp_path):
    """A case failing in its warm-up launches no marker and gets no entry; one failing in the
    profiled call has launched its marker, so it keeps its entry, with the error."""
    from bench.harness import Case
    h = Harness(torch.device("cpu"), True, tmp_path, verbose=False)
    calls = []

    def build(fail_at):
        def fn():
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("out of memory")
        return fn

    assert ncu._call(h, "op", Case("warm", [1], "float32", 8, lambda ops: build(1)), "cuda", None) == []
    calls.clear()
    [entry] = ncu._call(h, "op", Case("call", [1], "float32", 8, lambda ops: build(3)), "cuda", None)
    assert entry["case"] == "call" and entry["error"] == "RuntimeError: out of memory"
    (tmp_path / "ncu_cases.json").write_text(json.dumps([entry]))
    (tmp_path / "ncu.csv").write_text("\n".join([HEADER, _row(0, "spin_kernel(long)")]))
    assert "| (RuntimeError: out of memory) |" in ncu.table(tmp_path)
