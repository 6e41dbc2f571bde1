"""tests/jit_build.py: a builder killed mid-build leaves nothing that blocks the next one (NOTE:
[build locks])."""
import os
import subprocess
import sys
import textwrap

import jit_build

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_killed_builder_blocks_no_later_build(tmp_path):
    folder = str(tmp_path / "build")
    # a builder that takes the lock, leaves torch's lock file as FileBaton does mid-build, and
    # is killed while it holds both
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {HERE!r})
        import jit_build
        with jit_build.locked({folder!r}):
            open(os.path.join({folder!r}, "lock"), "w").close()
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(timeout=10)
    finally:
        holder.kill()
    assert os.path.exists(os.path.join(folder, "lock"))
    with jit_build.locked(folder):        # returns at once: the OS lock died with its holder
        assert not os.path.exists(os.path.join(folder, "lock"))


def test_each_torch_version_builds_apart():
    import torch
    assert jit_build.build_dir("x").endswith(os.path.join("build", "x", f"torch-{torch.__version__}"))
