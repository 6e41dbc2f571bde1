"""DDP (SPEC section 6): one all-reduce of the flat statistics buffer per statistics iteration, with
the output-gradient scale 1/world_size undone; 2 CPU processes on gloo must match one process on
the concatenated batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW

STEPS, WORLD = 10, 2


def _model(with_ln):
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 25, 6)]
    if with_ln:
        layers.append(nn.LayerNorm(6))
    return nn.Sequential(*layers, nn.Linear(6, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def _train(model, opt, batches, rank=0, world=1):
    per = batches[0][0].shape[0] // world
    for x, y in batches:
        sl = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()


def _worker(rank, init_file, out_dir, cls_name, preset, with_ln):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model(with_ln)
        ddp = nn.parallel.DistributedDataParallel(model)
        cls = {"AdaFisher": AdaFisher, "AdaFisherW": AdaFisherW}[cls_name]
        opt = cls(model, lr=1e-2, TCov=2, weight_decay=1e-3, preset=preset, backend="torch")
        _train(ddp, opt, _batches(), rank, WORLD)
        torch.save({"params": [p.detach() for p in model.parameters()],
                    "state": opt.fisher.state.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls_name, preset, with_ln", [("AdaFisher", "paper", True),
                                                       ("AdaFisherW", "official", False)])
def test_ddp_two_ranks_match_single_process(tmp_path, cls_name, preset, with_ln):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), cls_name, preset, with_ln),
             nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    model = _model(with_ln)
    cls = {"AdaFisher": AdaFisher, "AdaFisherW": AdaFisherW}[cls_name]
    opt = cls(model, lr=1e-2, TCov=2, weight_decay=1e-3, preset=preset, backend="torch")
    _train(model, opt, _batches())
    for a, b in zip(r0["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(r0["state"], opt.fisher.state, rtol=1e-11, atol=1e-13)
