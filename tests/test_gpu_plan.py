""".ci/gpu's split of the suite (NOTE: [GPU plan]): the first GPU call runs only the files in its
GPU_FILES, so a test file that runs kernels on the device but is missing there would never run on a
GPU.  Every file that asks for the device (the kernel_ops fixture, conftest.device(), a gpu mark or
a CUDA check) must be listed, and every listed file must exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USES_DEVICE = re.compile(r"kernel_ops|device\(\)|mark\.gpu|cuda\.is_available")


def test_gpu_files_cover_every_test_file_that_uses_the_device():
    script = (ROOT / ".ci" / "gpu").read_text()
    listed = set(re.search(r'^GPU_FILES="([^"]*)"', script, re.M).group(1).split())
    files = {p.stem: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    assert listed <= set(files), sorted(listed - set(files))
    uses = {name for name, text in files.items() if USES_DEVICE.search(text)}
    assert uses - {"test_gpu_plan"} <= listed, sorted(uses - listed)
    assert len(listed) >= 10
