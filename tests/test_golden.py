"""preset="official" replays the authors' released code's own trajectories (../shared/golden/):
parameters after steps 1, 2, 3, 5, 10, 30 and the EMA states after 30 steps, in float64."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "released_official.pt"
pytestmark = pytest.mark.skipif(not GOLDEN.exists(), reason=f"{GOLDEN} not present")


def _golden():
    return torch.load(GOLDEN, weights_only=False)


def _model(name):
    if name == "A":
        return nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                             nn.Conv2d(5, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(),
                             nn.Linear(8, 3))
    return nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("case", range(8))
def test_replays_released_trajectory(case):
    g = _golden()
    c = g["cases"][case]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = _model(c["model"])
    finally:
        torch.set_default_dtype(prev)
    model.load_state_dict(c["init"])
    opt_cls = {"AdaFisher": AdaFisher, "AdaFisherW": AdaFisherW}[c["optimizer"]]
    opt = opt_cls(model, backend="torch", **c["hparams"])
    loss_fn = nn.CrossEntropyLoss() if c["model"] == "A" else nn.MSELoss()
    xs, ys = g["inputs"][c["model"]], g["targets"][c["model"]]
    for t in range(1, 31):
        opt.zero_grad()
        loss_fn(model(xs[(t - 1) % 4]), ys[(t - 1) % 4]).backward()
        opt.step()
        if t in c["params_after"]:
            mine = model.state_dict()
            for k, v in c["params_after"][t].items():
                assert _rel(mine[k], v) < 1e-10, f"step {t} {k}: rel err {_rel(mine[k], v):.2e}"
    ema = opt.ema_state()
    for name, h in c["H_state_after_30"].items():
        assert _rel(ema[name][0], h) < 1e-10, f"H state of {name}"
    for name, s in c["S_state_after_30"].items():
        assert _rel(ema[name][1], s) < 1e-10, f"S state of {name}"
