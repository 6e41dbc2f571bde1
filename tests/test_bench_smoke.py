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
    assert {"released", "im2col", "floor", "x2sum", "torch"} <= conv
    assert {r["ratio_to"] for r in ok if r["op"] == "conv_stats"} == {"released"}
    assert any(r["backend"] == "adamw" for r in ok if r["op"] == "fused_step")
    chunks = {r["chunk"] for r in ok if r["op"] == "fused_step"}
    try:                                    # one-block chunks at smoke sizes (float32 parameters)
        from fisher_kernels.fused_step import BLOCK_BYTES
    except ImportError:
        assert chunks == {None}
    else:
        assert chunks == {BLOCK_BYTES // 4}
    e2e = [r for r in ok if r["kind"] == "e2e"]
    opts = {r["optimizer"] for r in e2e}
    assert {"sgd", "adamw", "AdaFisher TCov=1", "AdaFisher TCov=100", "AdaFisherW TCov=1",
            "AdaFisherW TCov=100"} <= opts
    assert {r["workload"] for r in e2e} == {"resnet18", "gpt4", "resnet18-cl"}
    cl = [r for r in e2e if r["workload"] == "resnet18-cl"]
    assert {(r["mode"], r["dtype"], r["optimizer"]) for r in cl} == \
        {("eager", "bf16-autocast", "adamw"), ("eager", "bf16-autocast", "AdaFisher TCov=1")}
    for r in e2e:
        assert r["time_ms"] > 0 and r["step_ms"] > 0 and r["ratio"] > 0 and r["host_ms"] > 0
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


def test_time_limit_skips_what_it_cannot_start(tmp_path):
    """--time-limit-s 0 (NOTE: [run deadline]): no case or configuration starts, each is one
    skipped row saying why, and the table is still written."""
    assert main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--backends", "torch",
                 "--quiet", "--time-limit-s", "0", "--modes", "eager"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines() if l]
    measured = [r for r in rows if r["status"] == "ok"]
    assert [r["kind"] for r in measured] == ["peak_bw"]
    late = [r for r in rows if r["status"] == "skipped" and "time-limit" in r["note"]]
    assert {r["op"] for r in late if r["kind"] == "op"} == set(OPS)
    e2e = [r for r in late if r["kind"] == "e2e"]
    assert {r["workload"] for r in e2e} == {"resnet18", "gpt4", "resnet18-cl"}
    assert {"adamw", "AdaFisher TCov=1"} <= {r["optimizer"] for r in e2e}
    assert "time-limit" in (tmp_path / "table.md").read_text()


def test_e2e_modes_and_backends_run_in_the_order_that_keeps_what_matters(tmp_path):
    """A run cut short keeps what comes first: the e2e modes run in the order given (the GPU
    plan's second call asks for cudagraph before compile, which compiles 28 configurations), and
    the kernel backends' rows come before the torch reference's."""
    assert main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--quiet", "--only", "e2e",
                 "--time-limit-s", "0", "--modes", "compile,eager"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines() if l]
    e2e = [r for r in rows if r["kind"] == "e2e" and "time-limit" in (r.get("note") or "")]
    modes = [r["mode"] for r in e2e]
    assert modes == sorted(modes, key=["compile", "eager"].index) and set(modes) == {"compile", "eager"}
    order = [r["backend"] for r in e2e if r["mode"] == "eager" and r["workload"] == "resnet18"
             and r["dtype"] == "float32" and r["optimizer"].startswith("AdaFisher")]
    assert "torch" in order and order[-1] == "torch" and order[0] != "torch"


def test_interrupt_still_writes_the_table(tmp_path, monkeypatch):
    """SIGINT (how .ci/gpu stops a stage at its deadline) mid-run: exit status 130, and the rows
    measured before it are in results.jsonl and table.md."""
    import bench.bench_norm_stats

    def interrupted(h):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench.bench_norm_stats, "run", interrupted)
    assert main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--backends", "torch",
                 "--quiet", "--only", "ops", "--ops", "linear_stats,norm_stats,fused_step"]) == 130
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines() if l]
    assert {r["op"] for r in rows if r["kind"] == "op"} == {"linear_stats"}
    assert "## linear_stats" in (tmp_path / "table.md").read_text()


def test_deterministic_run_appends_det_rows(tmp_path, monkeypatch):
    """--deterministic appended beside a default run: every case is timed under
    torch.use_deterministic_algorithms(True) and its rows are named <backend>+det, next to the
    default rows in the same table; the flag is off again afterwards."""
    import torch
    from bench import harness
    seen = []
    timer = harness.Harness.time

    def time(self, fn, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return timer(self, fn, *args, **kwargs)
    monkeypatch.setattr(harness.Harness, "time", time)
    args = ["--device", "cpu", "--smoke", "--out", str(tmp_path), "--backends", "torch", "--quiet",
            "--only", "ops", "--ops", "linear_stats,conv_stats"]
    assert main(args) == 0
    n_default = len(seen)
    assert main(args + ["--append", "--deterministic"]) == 0
    assert not any(seen[:n_default]) and all(seen[n_default:]) and len(seen) == 2 * n_default
    assert not torch.are_deterministic_algorithms_enabled()
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines() if l]
    ops = [r for r in rows if r["kind"] == "op"]
    assert {r["backend"] for r in ops} == {"torch", "torch+det", "released", "released+det",
                                           "im2col", "im2col+det", "floor", "floor+det", "x2sum",
                                           "x2sum+det"}
    assert all(r["status"] == "ok" for r in ops)
    assert "| torch+det |" in (tmp_path / "table.md").read_text()


def test_plots_are_skipped_without_matplotlib(smoke, monkeypatch, capsys):
    """matplotlib is in no extra of the package: without it the run keeps its JSON lines and
    table and says why there are no plots (it crashed at the end of a GPU run)."""
    import sys

    from bench.report import plots
    out, _ = smoke
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import raises ImportError
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert plots(rows, out) == []
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_conv_stats_floor_and_x2sum_baselines_compute_the_square_sum(tmp_path):
    """conv_stats' ``floor`` baseline (one reduction reading x once, float32 accumulation) and
    ``x2sum`` (the expression SPEC 8's anchor times) both compute sum over the batch of x^2, the
    floor as its square root: a baseline doing less work would flatter the kernels."""
    import torch
    from bench import bench_conv_stats
    from bench.harness import Harness
    h = Harness(torch.device("cpu"), True, tmp_path, verbose=False)
    case = bench_conv_stats.cases(h)[0]
    base, got = dict(case.baselines), {}
    for name in ("floor", "x2sum"):
        torch.manual_seed(0)                    # the same x for both
        got[name] = base[name]()()
    torch.manual_seed(0)
    want = torch.randn(case.shape).double().square().sum(0)
    torch.testing.assert_close(got["floor"].double().square(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["x2sum"].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("geometry", [dict(k=(3, 3), s=(1, 1), pad=1, g=1),
                                      dict(k=(3, 2), s=(2, 1), pad=(1, 0), g=1),
                                      dict(k=(1, 1), s=(2, 2), pad=0, g=1),
                                      dict(k=(3, 3), s=(2, 2), pad=1, g=2)])
def test_conv_stats_im2col_baselines_compute_the_patch_square_sums(geometry):
    """Both im2col baselines (``released``: the released code's op sequence; ``im2col``:
    F.unfold) add up the squares of the zero-padded patches per (channel, kh, kw), summed over
    groups' positions for ``released`` (its per-group feature index), by a loop over positions."""
    import torch
    from bench.bench_conv_stats import im2col_stats, released_stats
    k, s, g = geometry["k"], geometry["s"], geometry["g"]
    pad = geometry["pad"] if isinstance(geometry["pad"], tuple) else (geometry["pad"],) * 2
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    xp = torch.nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    want = torch.zeros(4, *k, dtype=torch.float64)
    for i in range(0, xp.shape[2] - k[0] + 1, s[0]):
        for j in range(0, xp.shape[3] - k[1] + 1, s[1]):
            want += xp[:, :, i:i + k[0], j:j + k[1]].square().sum(0)
    got = {}
    for name, fn, args in (("released", released_stats, (g,)),
                           ("im2col", im2col_stats, ((1, 1), g))):
        out = torch.zeros(4 * k[0] * k[1], dtype=torch.float64)
        fn(x, out, k, s, [(p, p) for p in pad], *args)
        got[name] = out.view(4, *k)
    torch.testing.assert_close(got["im2col"], want)
    # the released code's feature index is (C/g, kh, kw): each group's channels land on the same
    torch.testing.assert_close(got["released"][:4 // g], want.view(g, 4 // g, *k).sum(0))
    assert not got["released"][4 // g:].any()


def test_report_conv_targets_take_each_case_s_own_baselines():
    """The SPEC 8 conv_stats line divides each case's released-im2col time by a backend's time in
    that case (the slowest such speedup per backend), the stricter line F.unfold's; rows of a run
    without ``released`` rows (2026-12-04) leave that line empty rather than misname the other."""
    from bench.report import targets

    def row(case, backend, ms):
        return {"kind": "op", "op": "conv_stats", "case": case, "dtype": "float32",
                "backend": backend, "status": "ok", "time_ms": ms}
    rows = [row("a", "released", 6.0), row("a", "im2col", 3.0), row("a", "cuda", 0.1),
            row("a", "triton", 0.3), row("b", "released", 1.0), row("b", "im2col", 0.5),
            row("b", "cuda", 0.04), row("b", "triton", 0.02)]
    text = "\n".join(targets(rows))
    # cuda: min(6/0.1, 1/0.04) = 25, min(3/0.1, 0.5/0.04) = 12.5; triton: min(20, 50), min(10, 25)
    assert "| conv_stats: slowest speedup vs the released code's im2col (>= 30x) | 25.0x FAIL | " \
           "20.0x FAIL |" in text
    assert "| conv_stats: slowest speedup vs F.unfold im2col (>= 30x) | 12.5x FAIL | " \
           "10.0x FAIL |" in text
    old = "\n".join(targets([r for r in rows if r["backend"] != "released"]))
    assert "| conv_stats: slowest speedup vs the released code's im2col (>= 30x) | - | - |" in old


def test_pytest_benchmark_entry_point_runs_every_op(tmp_path):
    """``pytest bench`` (bench/test_bench_ops.py, outside CI's testpaths) on the smoke shapes,
    with --benchmark-disable (each call once, untimed; its missing stats crashed every case):
    every op on the torch backend, and conv_stats' two im2col baselines."""
    import os
    import subprocess
    import sys
    pytest.importorskip("pytest_benchmark")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, BENCH_SMOKE="1", BENCH_PYTEST_OUT=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "--benchmark-disable", "-rA", "bench/test_bench_ops.py"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    passed = [l for l in run.stdout.splitlines() if l.startswith("PASSED")]
    for op in OPS:
        assert any(f"[{op}-" in l and l.endswith("-torch]") for l in passed), op
    for base in ("released", "im2col"):
        assert any("[conv_stats-" in l and l.endswith(f"-{base}]") for l in passed), base


def test_report_renders_rows_of_earlier_runs():
    """``python -m bench.report`` re-renders an earlier results.jsonl, and ``--append`` adds to
    one: conv_stats rows written before the x2sum baseline carry ``anchor_floor_ms`` (a KeyError
    left no table.md)."""
    from bench.report import markdown
    row = {"kind": "op", "op": "conv_stats", "case": "resnet50 64x64x56x56 k3", "backend": "im2col",
           "dtype": "float32", "status": "ok", "time_ms": 3.7, "anchor_im2col_ms": 3.76,
           "anchor_floor_ms": 0.074}
    assert "x^2 sum 0.074 ms (H100)" in markdown([row])


def test_report_says_when_the_released_figures_come_from_another_gpu():
    """The released code's figures are an H100's; a table from another GPU says to compare
    ratios, and one from an H100, or without released figures, does not."""
    from bench.report import markdown
    row = {"kind": "e2e", "op": "e2e", "case": "resnet18", "backend": "cuda", "dtype": "float32",
           "status": "ok", "time_ms": 10.0, "ratio": 1.02, "anchor_time_ms": 41.0}
    warn = "The `released` figures were measured on an H100, this run on NVIDIA H200"
    assert warn in markdown([dict(row, gpu="NVIDIA H200")])
    assert "The `released` figures" not in markdown([dict(row, gpu="NVIDIA H100 80GB HBM3")])
    no_anchor = {k: v for k, v in row.items() if k != "anchor_time_ms"}
    assert "The `released` figures" not in markdown([dict(no_anchor, gpu="NVIDIA H200")])


def test_host_benchmark_rows_and_restored_kernels(tmp_path, capsys, monkeypatch):
    """``python -m bench.host --smoke`` on CPU: one step() row and one hooks row per workload and
    TCov, measured on the Triton backend with the kernels stubbed, and the stubs, thread count
    and environment as they were afterwards (a later launch runs the real kernel; on a GPU
    machine a TRITON_INTERPRET left set would let later tests put the Triton backend on CPU
    tensors).  No timing assertions."""
    import os
    import sys
    import torch
    from bench import host
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # as on a GPU machine
    threads = torch.get_num_threads()
    assert host.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    assert "TRITON_INTERPRET" not in os.environ
    rows = [json.loads(l) for l in (tmp_path / "host.jsonl").read_text().splitlines()]
    runs = [("resnet18", 100), ("resnet18", 1), ("gpt4", 100), ("gpt4", 1)]
    ops = [r for r in rows if r["kind"] == "host_op"]
    rows = [r for r in rows if r["kind"] != "host_op"]
    assert [(r["kind"], r["workload"], r["TCov"]) for r in rows] == (
        [("host_step", *run) for run in runs] + [("host_hooks", *run) for run in runs])
    # one row per statistics op case, each launcher timed
    assert {r["op"] for r in ops} == {"conv_stats", "linear_stats", "norm_stats", "embedding_stats"}
    assert len(ops) == len(host.op_cases(True)) and all(r["host_us"] > 0 for r in ops)
    assert all(r["backend"] == "triton" and r["kernels"] == "stubbed" for r in ops)
    for r in rows:
        assert r["backend"] == "triton" and r["kernels"] == "stubbed" and r["ratio"] > 0
        if r["kind"] == "host_step":
            assert r["params"] > 20 and r["adafisher_us"] > 0 and r["adamw_us"] > 0
        else:       # every hooked layer of bench/models.py's ResNet-18 and GPT
            assert r["layers"] == {"resnet18": 41, "gpt4": 26}[r["workload"]]
            assert r["hooked_us"] > 0 and r["plain_us"] > 0
            assert r["per_layer_us"] == pytest.approx((r["hooked_us"] - r["plain_us"]) / r["layers"])
            # the launchers' share: the same model timed with the statistics ops as no-ops
            assert r["no_ops_us"] > 0
            assert r["launcher_us"] == pytest.approx((r["hooked_us"] - r["no_ops_us"]) / r["layers"])
            # a statistics iteration launches at least each layer's H and S kernels; the others
            # at most zero_grad()'s clearing of the statistics buffer
            assert r["launches"] >= 2 * r["layers"] if r["TCov"] == 1 else r["launches"] <= 1
    out = capsys.readouterr().out
    assert "| resnet18 | 62 |" in out and "| resnet18 | 41 |" in out
    fs = sys.modules["fisher_kernels.fused_step"]
    assert not isinstance(fs._fused_step_kernel, host._NoLaunch)
    p = torch.zeros(3)
    p.grad = torch.ones(3)
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    opt.step()
    assert (p != 0).all()                       # torch._fused_adamw_ is the real one again


def test_profile_rows_split_the_iteration_by_op(tmp_path):
    """``python -m bench.profile_e2e`` on CPU (torch backend): per workload, AdamW, AdaFisher
    TCov=1 and TCov=100; the ops' profiler ranges count each call: one conv_stats per Conv2d of
    the model and one layer_ema per statistics iteration, one fused_step per step, no statistics
    at TCov=100 after the warm-up.  No timing assertions."""
    import torch
    import torch.nn as nn
    from bench import bench_e2e, profile_e2e
    from bench.harness import Harness
    profile_e2e.main(["--device", "cpu", "--out", str(tmp_path), "--iters", "2",
                      "--backends", "torch"])
    rows = [json.loads(l) for l in (tmp_path / "profile.jsonl").read_text().splitlines()]
    assert [(r["workload"], r["optimizer"]) for r in rows] == [
        (w, o) for w in ("resnet18", "gpt4") for o in profile_e2e.LABELS]
    h = Harness(torch.device("cpu"), True, tmp_path / "h")
    convs = {w: sum(isinstance(m, nn.Conv2d) for m in mk().modules())
             for w, mk, _, _ in bench_e2e.workloads(h)}
    for r in rows:
        assert r["status"] == "ok" and r["wall_ms"] > 0, r
        ops = r["ops"]
        if r["optimizer"] == "adamw":
            assert ops == {}
            continue
        assert ops["fused_step"]["calls"] == 1 and ops["fused_step"]["host_ms"] > 0
        stats = {k for k in ops if k.endswith("_stats")}
        if r["optimizer"].endswith("TCov=100"):
            assert not stats and "layer_ema" not in ops
        else:
            assert ops["layer_ema"]["calls"] == 1
            assert ops.get("conv_stats", {"calls": 0})["calls"] == convs[r["workload"]]
            assert "linear_stats" in stats
    table = (tmp_path / "profile.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and "| resnet18 | AdaFisher TCov=1 | torch |" in table[3]


def test_stats_floor_counts_what_the_statistics_read():
    """bench.floor: one iteration's statistics read each hooked layer's input and output
    gradient, counted from the shapes (float32, 4 bytes an entry)."""
    import torch
    import torch.nn as nn
    from bench import floor

    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5))

    def batch():
        return torch.randn(2, 3, 6, 6, device="meta"), torch.randint(0, 5, (2,), device="meta")

    # conv: x 2x3x6x6, its output gradient 2x4x4x4; BatchNorm: its input and output gradient,
    # 2x4x4x4 each; Linear: x 2x64, output gradient 2x5
    want = 4 * (2 * 3 * 36 + 3 * 2 * 4 * 16 + 2 * 64 + 2 * 5)
    for preset in ("official", "paper"):
        assert floor.stats_bytes("tiny", model, batch, preset) == want


def test_stats_floor_rows_against_a_run(tmp_path, capsys):
    """bench.floor with a results folder: the floor at its peak bandwidth, and its AdamW and
    AdaFisher TCov=1 rows as the time SPEC 8 allows and the time measured beyond AdamW's."""
    from bench import floor
    run = tmp_path / "run"
    run.mkdir()
    common = dict(status="ok", mode="eager", dtype="float32", workload="resnet18")
    rows = [dict(kind="peak_bw", status="ok", gbps=2000.0),
            dict(kind="e2e", optimizer="adamw", backend="torch", time_ms=10.0, **common),
            dict(kind="e2e", optimizer="AdaFisher TCov=1", backend="cuda", time_ms=12.5, **common)]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert floor.main(["--results", str(run), "--out", str(tmp_path)]) == 0
    out = [json.loads(l) for l in (tmp_path / "floor.jsonl").read_text().splitlines()]
    r18 = next(r for r in out if r["workload"] == "resnet18" and r["preset"] == "official")
    assert r18["stats_bytes"] > 2e9          # ResNet-18 at batch 256: 2.57 GB
    assert r18["floor_ms"] == pytest.approx(r18["stats_bytes"] / 2e12 * 1e3)
    assert r18["floor_share"] == pytest.approx(r18["floor_ms"] / 10.0)
    assert r18["allowed_ms"] == pytest.approx(0.6) and r18["extra_ms_cuda"] == pytest.approx(2.5)
    assert "extra_ms_triton" not in r18
    assert "| resnet18 b256 3x32x32 | official |" in capsys.readouterr().out


def test_instruction_counts_phases_and_rows(tmp_path, monkeypatch, capsys):
    """``python -m bench.instructions`` (NOTE: [instruction counts]): the child runs each phase
    between two marks, where callgrind dumps its counters (here without valgrind: the marks
    counted), and a workload's row divides each dump by the iterations and the layers."""
    from bench import instructions
    marks = []
    monkeypatch.setattr(instructions, "_mark", lambda: marks.append(1))
    instructions.child("resnet18", 1)
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta == {"workload": "resnet18", "layers": 41, "backend": "triton"}
    assert len(marks) == len(instructions.PHASES) + 1
    # dumps as callgrind writes them: the warm-up's, then one per phase
    counts = [999, 1000, 1500, 5000, 9000, 700, 300]
    for n, c in enumerate(counts, 1):
        (tmp_path / f"w.{n}").write_text(f"version: 1\ncreator: callgrind\nsummary: {c}\ntotals: {c}\n")
    row = instructions.row(meta, instructions.read_dumps(tmp_path / "w"), iters=10)
    assert row["per_iteration"] == {"bare": 100, "plain": 150, "no_ops": 500, "stats": 900,
                                    "step1": 70, "adamw": 30}
    assert row["plain_per_layer"] == pytest.approx(50 / 41)
    assert row["stats_per_layer"] == pytest.approx(800 / 41)
    with pytest.raises(RuntimeError, match="6 callgrind dumps, expected 7"):
        instructions.row(meta, counts[:6], iters=10)


def test_md_table_lines():
    """Every table the suite prints or writes goes through ``md_table``: a header, the separator
    with one cell per column, then a row per line with its cells as str() gives them."""
    from bench.common import md_table
    assert md_table(["a", "b c"], [(1, None), ("x", 2.5)]) == [
        "| a | b c |", "|---|---|", "| 1 | None |", "| x | 2.5 |"]
    assert md_table(["only"], []) == ["| only |", "|---|"]
