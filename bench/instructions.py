"""Host cost in instructions, not microseconds: ``python -m bench.instructions [--iters N]
[--out DIR]`` (needs valgrind; CPU only).

NOTE: [instruction counts] ``bench.host`` times the hooks and ``step()`` on the CPU with the
kernels stubbed, but on a shared 2-core host its rows move by +-10 us per hooked layer from one
run to the next, more than most changes to the hooks' Python save.  Instructions executed do not
depend on the host's load: this runs bench.host's narrow workloads (the same models, the same
stubbed kernels) in one process per workload under valgrind's callgrind, which writes its
counters out (and zeroes them) at each call of ``getsid``, a libc function nothing else here
calls: ``_mark()`` between phases.  Each phase runs N iterations of one configuration, after
warm-up, so its count over N is the instructions per iteration, the same from run to run (with
PYTHONHASHSEED fixed) up to a few hundred.  Phases, per workload:

- ``bare``: zero_grad() (an SGD's) + forward + backward of the model without hooks;
- ``plain``: the same with AdaFisher's hooks on an iteration that gathers nothing (TCov=100);
- ``no_ops``: a statistics iteration (TCov=1) with the statistics ops as no-ops (``_NoOps``):
  the hooks' own bookkeeping;
- ``stats``: a statistics iteration with the backend's launchers (kernels stubbed);
- ``step1`` / ``adamw``: AdaFisher's step() at TCov=1 and AdamW(fused=True)'s, the same
  gradients each time (kernels stubbed).

Reported per hooked layer: ``plain``, ``no_ops`` and ``stats`` minus ``bare``, divided by the
layers; and the two steps.  Instructions are not time (a launch's syscall, cache misses), but
a change that removes instructions from the hooks' Python removes their time.  One JSON line per
workload in ``DIR/instructions.jsonl``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from .common import md_table, write_jsonl

PHASES = ("bare", "plain", "no_ops", "stats", "step1", "adamw")


def _mark() -> None:
    """Where callgrind dumps its counters (``--dump-before=getsid``); a no-op without it."""
    os.getsid(0)


def child(workload: str, iters: int, backend: str = "triton") -> None:
    """Run the phases of ``workload`` (bench.host's smoke models), marking each end."""
    import torch
    from adafisher_fast import AdaFisher
    from . import host
    label, factory, inputs = next(w for w in host.workloads(True) if w[0] == workload)
    x = inputs("cpu")
    # (stubbed_kernels runs the model on one thread, whose count is the same from run to run)
    with host.stubbed_kernels(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        bare = factory()
        models = {}
        for tcov in (100, 1):
            m = copy.deepcopy(bare)
            models[tcov] = (m, AdaFisher(m, lr=1e-4, TCov=tcov, backend=backend))

        for m, opt in models.values():          # steps = 1: TCov=100 gathers nothing now
            host.iteration(m, x, opt.zero_grad)()
            opt.step()
        m1, opt1 = models[1]
        adamw = torch.optim.AdamW(m1.parameters(), lr=1e-4, fused=True)
        stats = host.iteration(m1, x, opt1.zero_grad)

        def no_ops():
            with host.no_ops(opt1):
                stats()
        runs = {"bare": host.bare_iteration(bare, x),
                "plain": host.iteration(models[100][0], x, models[100][1].zero_grad),
                "no_ops": no_ops, "stats": stats, "step1": opt1.step, "adamw": adamw.step}
        for run in runs.values():               # warm-up: caches, plans, AdamW's state
            for _ in range(3):
                run()
        stats()                                 # the steps' gradients: a statistics iteration's
        _mark()
        for name in PHASES:
            for _ in range(iters):
                runs[name]()
            _mark()
    print(json.dumps({"workload": label, "layers": len(opt1.fisher.layers),
                      "backend": opt1.backend}))


def read_dumps(prefix: Path) -> list:
    """The instruction counts of callgrind's dumps ``prefix.1``, ``prefix.2``, ... in order."""
    counts = []
    n = 1
    while (f := Path(f"{prefix}.{n}")).exists():
        m = re.search(r"^summary:\s+(\d+)", f.read_text(), re.M)
        if m is None:
            raise RuntimeError(f"{f}: no 'summary:' line (not a callgrind dump?)")
        counts.append(int(m.group(1)))
        n += 1
    return counts


def row(meta: dict, counts: list, iters: int) -> dict:
    """A workload's row from its dumps: [warm-up, then one per phase]."""
    if len(counts) != len(PHASES) + 1:
        raise RuntimeError(f"{meta['workload']}: {len(counts)} callgrind dumps, expected "
                           f"{len(PHASES) + 1} (the run was cut short?)")
    per = dict(zip(PHASES, (c / iters for c in counts[1:])))
    layers = meta["layers"]
    return dict(kind="host_instructions", **meta, iters=iters, per_iteration=per,
                **{f"{p}_per_layer": (per[p] - per["bare"]) / layers
                   for p in ("plain", "no_ops", "stats")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.instructions",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50, help="iterations per phase")
    ap.add_argument("--out", type=Path, default=None, help="folder for instructions.jsonl")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.iters)
        return 0
    if shutil.which("valgrind") is None:
        print("bench.instructions: valgrind is not installed", file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # bench's parent:
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))  # not installed
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for w in ("resnet18", "gpt4"):          # side by side: a process each
            cmd = ["valgrind", "--tool=callgrind", "--dump-before=getsid",
                   f"--callgrind-out-file={tmp}/{w}", sys.executable, "-m", "bench.instructions",
                   "--child", w, "--iters", str(args.iters)]
            procs[w] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        for w, p in procs.items():
            out, err = p.communicate()
            if p.returncode:
                raise RuntimeError(f"bench.instructions: {w} failed:\n{err[-2000:]}")
            rows.append(row(json.loads(out.strip().splitlines()[-1]), read_dumps(Path(tmp) / w),
                            args.iters))
    print("\n".join(md_table(
        ["workload", "hooked layers", "bare", "plain", "no-op ops", "statistics", "step TCov=1",
         "AdamW step", "plain / layer", "bookkeeping / layer", "launchers / layer"],
        [(r["workload"], r["layers"], *(f"{r['per_iteration'][k] / 1e3:.0f}k" for k in PHASES),
          f"{r['plain_per_layer'] / 1e3:.1f}k", f"{r['no_ops_per_layer'] / 1e3:.1f}k",
          f"{(r['stats_per_layer'] - r['no_ops_per_layer']) / 1e3:.1f}k") for r in rows])))
    if args.out is not None:
        write_jsonl(args.out / "instructions.jsonl", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
