"""The two presets of SPEC section 2, as data: the order of EMA and min-max normalisation, the EMA
weights, and F of factor-free parameters.  Layer statistics that differ per preset live with their
layer kind in ``layers.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .reference import EmaRule


@dataclass(frozen=True)
class Preset:
    name: str
    ema_rule: Callable[[float], EmaRule]
    #: F of a parameter without factors: 1 + Lambda (paper, identity factors) or 1 (released code)
    free_params_get_lambda: bool
    #: layer kinds of the released code (the others are not hooked under this preset)
    only_released_layers: bool


PRESETS = {
    # Released code: normalise the raw statistic, then state = state * gamma/10 + v' * gamma/100,
    # state starting at ones; H' = S' = the state itself.
    "official": Preset("official", lambda g: EmaRule(g / 10, g / 100, g / 10, g / 100, True, False),
                       free_params_get_lambda=False, only_released_layers=True),
    # Paper Eqs. (3)-(4): state = raw at the first statistics iteration, then
    # state = gamma * raw + (1 - gamma) * state; H' = min-max(state) at every step.
    "paper": Preset("paper", lambda g: EmaRule(1 - g, g, 0.0, 1.0, False, True),
                    free_params_get_lambda=True, only_released_layers=False),
}
