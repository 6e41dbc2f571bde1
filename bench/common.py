"""Helpers shared by the kernel benchmarks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOKE_CASES = 2     # cases per op kept in smoke runs (the first ones, then evenly spread)


def dtypes(h) -> List[str]:
    """Input dtypes of the statistics ops: fp32 and bf16 (autocast activations) on GPU."""
    return ["float32"] if h.smoke or not h.cuda else ["float32", "bfloat16"]


def thin(h, items: list) -> list:
    """Smoke runs keep a few evenly spread cases: same code, seconds."""
    if not h.smoke or len(items) <= SMOKE_CASES:
        return items
    step = len(items) / SMOKE_CASES
    return [items[int(i * step)] for i in range(SMOKE_CASES)]


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> List[str]:
    """The lines of a markdown table: ``header``'s titles, then a line per row of cells."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """``rows`` as JSON lines in ``path`` (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
