"""The benchmark suite's smoke run (``python -m bench --smoke`` on CPU, tiny shapes): it runs end
to end into a temporary folder and writes sane rows, a table and plots.  No timing assertions."""
import json

import pytest

from bench.__main__ import OPS, main

ROW_FIELDS = ("kind", "op", "case", "backend", "shape", "dtype", "status", "time_ms", "gbps",
              "pct_peak", "gpu", "torch", "triton", "timestamp")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # torch only: interpreted Triton kernels (TRITON_INTERPRET=1 on CPU) would take minutes here;
    # the kernels' own tests cover them
    assert main(["--device", "cpu", "--smoke", "--out", str(out), "--backends", "torch",
                 "--quiet"]) == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines() if l]
    return out, rows


def test_rows_have_the_fields(smoke):
    _, rows = smoke
    assert rows
    for r in rows:
        for k in ROW_FIELDS:
            assert k in r, (k, r)
        assert r["status"] in ("ok", "skipped"), r        # no benchmark crashed
        assert r["device"] == "cpu" and r["smoke"] is True


def test_every_op_and_e2e_measured(smoke):
    _, rows = smoke
    ok = [r for r in rows if r["status"] == "ok"]
    peak = [r for r in ok if r["kind"] == "peak_bw"]
    assert len(peak) == 1 and peak[0]["gbps"] > 0
    for op in OPS:
        mine = [r for r in ok if r["kind"] == "op" and r["op"] == op and r["backend"] == "torch"]
        assert mine, op
        for r in mine:
            assert r["time_ms"] > 0 and r["q20_ms"] <= r["time_ms"] <= r["q80_ms"]
            assert r["bytes"] > 0 and r["gbps"] > 0 and r["pct_peak"] > 0
    conv = {r["backend"] for r in ok if r["op"] == "conv_stats"}
    assert {"im2col", "torch"} <= conv
    assert any(r["backend"] == "adamw" for r in ok if r["op"] == "fused_step")
    e2e = [r for r in ok if r["kind"] == "e2e"]
    opts = {r["optimizer"] for r in e2e}
    assert {"sgd", "adamw", "AdaFisher TCov=1", "AdaFisher TCov=100", "AdaFisherW TCov=1",
            "AdaFisherW TCov=100"} <= opts
    assert {r["workload"] for r in e2e} == {"resnet18", "gpt4", "resnet18-cl"}
    cl = [r for r in e2e if r["workload"] == "resnet18-cl"]
    assert {(r["mode"], r["dtype"], r["optimizer"]) for r in cl} == \
        {("eager", "bf16-autocast", "adamw"), ("eager", "bf16-autocast", "AdaFisher TCov=1")}
    for r in e2e:
        assert r["time_ms"] > 0 and r["step_ms"] > 0 and r["ratio"] > 0
        if r["optimizer"] == "adamw":
            assert r["ratio"] == pytest.approx(1.0)
    assert any(r.get("anchor_time_ms") == 70.5 for r in e2e)


def test_e2e_modes_ratio_to_adamw_in_the_same_mode(smoke):
    """eager and compile rows (compile: aot_eager in smoke runs), each row's ratio taken to AdamW
    of its own mode, workload and dtype; cudagraph is a skipped row on CPU, with the reason."""
    out, rows = smoke
    e2e = [r for r in rows if r["kind"] == "e2e" and r["status"] == "ok"]
    assert {r["mode"] for r in e2e} == {"eager", "compile"}
    comp = [r for r in e2e if r["mode"] == "compile"]
    assert {"adamw", "AdaFisher TCov=1"} <= {r["optimizer"] for r in comp}
    base = {(r["mode"], r["workload"], r["dtype"]): r["time_ms"] for r in e2e
            if r["optimizer"] == "adamw"}
    for r in e2e:
        assert r["ratio"] == pytest.approx(r["time_ms"] / base[r["mode"], r["workload"], r["dtype"]])
    for r in comp:
        assert r["compile_backend"] == "aot_eager" and r["setup_s"] > 0
        assert "anchor_time_ms" not in r and "target_ratio" not in r    # eager-only figures
    graph = [r for r in rows if r["kind"] == "e2e" and r.get("mode") == "cudagraph"]
    assert len(graph) == 1 and graph[0]["status"] == "skipped" and "CUDA" in graph[0]["note"]
    md = (out / "table.md").read_text()
    assert "| float32 | compile | AdaFisher TCov=1 | torch |" in md
    assert "**skipped** cudagraph mode not run" in md


def test_table_and_plots(smoke):
    out, _ = smoke
    md = (out / "table.md").read_text()
    for op in OPS:
        assert f"## {op}" in md
    assert "ratio to AdamW" in md and "released ms/iter" in md
    for png in ["e2e.png"] + [f"ops_{op}.png" for op in OPS]:
        assert (out / png).stat().st_size > 1000, png
