"""The CUDA emulator itself (csrc/emu/, NOTE: [CUDA emulator]): tests/cuda_emu_selftest.cu, built with
g++ after the launch rewrite of tests/cuda_emu.py, must reduce through shuffles and shared memory
correctly, visit every thread of a 3-d grid once, and stop kernels whose threads meet at different
barriers or shuffle with an exited lane, or that ask for too many threads, with a clear error.
Then the CUDA op tests under AddressSanitizer and UBSan (NOTE: [emulated memcheck]), and a training
run on the emulated backend with each block's threads run forward and in reverse (a racecheck-lite)."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.cpp_extension import include_paths

import cuda_emu
from adafisher_fast import AdaFisherW
from conftest import emulated, kernel_module
from launch_shapes import gpu_launches


def test_rewrite_turns_every_launch_into_a_call():
    src = "k<T, A><<<dim3(g, 2), 256, 0, s>>>(\n  x, y);\nf<<<n, 32>>>(a);"
    out, n = cuda_emu.rewrite_launches(src)
    assert n == 2
    assert out == ("::af_emu::launch(k<T, A>, dim3(g, 2), 256, 0, s)(\n  x, y);\n"
                   "::af_emu::launch(f, n, 32)(a);")


def _program(name: str, tmp_path, flags=()):
    """(executable, launches, __shared__ declarations) of tests/<name>.cu built with g++ and the
    emulator after cuda_emu's rewrites, as csrc/ is."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".cu")) as f:
        src, n_shared = cuda_emu.poison_shared(f.read())
    src, n = cuda_emu.rewrite_launches(src)
    (tmp_path / f"{name}.cpp").write_text(src)
    emu, exe = os.path.join(cuda_emu.CSRC, "emu"), tmp_path / name
    includes = [f"-I{d}" for d in [emu, cuda_emu.CSRC] + include_paths()]   # c10's Half, BFloat16
    subprocess.run(["g++", "-std=c++17", "-O1", *flags, *includes,
                    os.path.join(emu, "emu.cpp"), str(tmp_path / f"{name}.cpp"), "-o", str(exe)],
                   check=True, timeout=300)
    return exe, n, n_shared


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_emulator_selftest(tmp_path):
    exe, n, n_shared = _program("cuda_emu_selftest", tmp_path)
    assert (n, n_shared) == (12, 2)
    lines = dict(line.split(" ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                                 check=True, timeout=60).stdout.splitlines())
    assert lines["block_sum"] == "ok"
    assert lines["coverage"] == "ok"
    assert lines["sync_or"] == "ok"
    assert lines["sync_or_exited"] == "ok"
    assert lines["mixed_barrier"].startswith(
        "719 CUDA emulator: block (0,0,0): threads wait at different barriers")
    assert lines["exited_lane"].startswith("719 CUDA emulator: warp shuffle from lane 16")
    assert lines["too_many_threads"].startswith("9 CUDA emulator: invalid launch configuration")
    # NOTE: [CUDA emulator]: barriers and shuffles matched by call site, shuffle masks checked
    assert re.fullmatch(r"719 CUDA emulator: block \(0,0,0\): threads wait at different __syncthreads "
                        r"\(\S+selftest\.cpp:(\d+) and \S+selftest\.cpp:(?!\1)\d+\)", lines["two_barriers"])
    assert re.fullmatch(r"719 CUDA emulator: block \(0,0,0\): lanes of warp 0 shuffle at different sites "
                        r"\(\S+:(\d+) and \S+:(?!\1)\d+\)", lines["shuffle_sites"])
    assert lines["shuffle_mask"].startswith("719 CUDA emulator: warp shuffle of lane 0 from lane 16 with "
                                            "mask 65535, which leaves one of them out")
    # NOTE: [poisoned shared memory]: unwritten shared memory reads as 0xFF bytes in every block,
    # not as zeros (a static's first value) or the previous block's 7 and 8
    assert lines["shared_unwritten"] == "0 -1 -1 -1 -1"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_sanitizers_stop_a_misaligned_word(tmp_path):
    """The sanitized build's flags (NOTE: [emulated memcheck]) turn a 16-byte word taken at a
    4-byte-aligned address through csrc/'s load_word into an error, as a GPU does."""
    if not cuda_emu.asan_env(str(tmp_path / "asan")):
        pytest.skip("gcc has no libasan or libubsan here")
    exe, n, _ = _program("cuda_emu_misaligned", tmp_path, cuda_emu.SANITIZE)
    assert n == 1
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="halt_on_error=1")
    ok = subprocess.run([str(exe), "0"], capture_output=True, text=True, timeout=60, env=env)
    assert (ok.returncode, ok.stdout) == (0, "sum 10\n"), ok.stderr[-2000:]
    bad = subprocess.run([str(exe), "1"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode != 0 and "sum" not in bad.stdout
    assert re.search(r"common\.cuh:\d+:\d+: runtime error: .*misaligned address 0x[0-9a-f]+ for type "
                     r"'const (struct )?uint4', which requires 16 byte alignment", bad.stderr), bad.stderr[-2000:]


def test_cuda_ops_under_sanitizers(tmp_path):
    """The CUDA backend's op tests and per-op sweeps, emulated, with every heap access checked
    (ASan) and undefined behaviour stopped (UBSan: misaligned words, signed overflow, ...)."""
    if not emulated("cuda"):
        pytest.skip("with a GPU the op tests run the real kernels: compute-sanitizer checks those")
    env = cuda_emu.asan_env(str(tmp_path / "asan"))
    if not env:
        pytest.skip("gcc has no libasan or libubsan here")
    here = os.path.dirname(os.path.abspath(__file__))
    tests = ["test_cuda_backend.py", "test_linear_stats.py", "test_conv_stats.py", "test_norm_stats.py",
             "test_embedding_stats.py", "test_layer_ema.py", "test_fused_step.py", "test_deterministic.py"]
    # -s: UBSan reports on stderr, which a test's capture would take down with the process
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-k", "not triton"]
                       + [os.path.join(here, t) for t in tests],
                       cwd=os.path.dirname(here), env=env, capture_output=True, text=True,
                       timeout=840)      # below pytest.ini's faulthandler_timeout, which would orphan it
    reports = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert "ERROR: AddressSanitizer" not in reports, reports[:4000]
    ub = r.stderr.find("runtime error:")
    assert ub < 0, r.stderr[max(0, ub - 200):ub + 3000]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


class _Net(nn.Module):
    """Every layer kind the CUDA ops serve: Embedding, Linear, Conv1d/2d (stride, groups, circular
    padding), BatchNorm, GroupNorm, LayerNorm."""
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular"),
                                   nn.GroupNorm(4, 8), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8 * 4 * 4 + 8, 33), nn.LayerNorm(33), nn.ReLU(), nn.Linear(33, 5))

    def forward(self, tokens, img):
        seq = self.conv1(self.emb(tokens).transpose(1, 2)).mean(2)
        return self.head(torch.cat([self.conv2(img), seq], 1))


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_thread_order_does_not_change_results(preset, monkeypatch):
    """Racecheck-lite (NOTE: [CUDA emulator]): a training run on the emulated CUDA backend gives
    bitwise the same parameters and state when every block runs its threads in reverse order.
    A missing __syncthreads between a shared-memory write and another thread's read changes the
    result in one of the two orders."""
    if not emulated("cuda"):
        pytest.skip("emulator test; on a GPU compute-sanitizer's racecheck runs the real kernels")
    kernel_module("cuda", monkeypatch)
    g = torch.Generator().manual_seed(1)
    tokens, img = torch.randint(0, 11, (16, 6), generator=g), torch.randn(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    runs = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("ADAFISHER_EMU_THREAD_ORDER", order)
        torch.manual_seed(0)
        model = _Net()
        opt = AdaFisherW(model, lr=1e-2, TCov=1, weight_decay=1e-2, preset=preset, backend="cuda")
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(tokens, img), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()]
                    + [t.clone() for t in opt.fisher.tensors().values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_launch_configurations_at_gpu_sizes(emu_launches, monkeypatch):
    """The CUDA launchers over the launches tests/triton_codegen.py compiles for Triton (the GPU
    tests' and benchmarks' shapes, tests/launch_shapes.py), deterministic or not, with
    ADAFISHER_EMU_DRY=1 (NOTE: [CUDA emulator]): each launch's grid and block are what a GPU takes
    (the emulator refuses others), and no kernel runs, so no input is read."""
    if not emulated("cuda"):
        pytest.skip("emulator test; on a GPU the GPU tests launch these shapes")
    ops = kernel_module("cuda")
    monkeypatch.setenv("ADAFISHER_EMU_DRY", "1")
    gpu_launches(ops)
    grids = [(x, y) for _, x, y in emu_launches()]
    assert len(grids) > 100 and max(y for _, y in grids) > 1
