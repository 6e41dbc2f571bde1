"""Microbenchmark of ``embedding_stats`` (token frequencies, preset="paper").

Cases: GPT-2 small's 16 x 1024 tokens over a 50257 vocabulary, and the e2e GPT's 16 x 256 tokens
over 8192.

Bytes model:

| op               | bytes counted                                  |
|------------------|------------------------------------------------|
| embedding_stats  | read idx (8 * tokens, int64) + read/write out (2 * 4 * vocab) |
"""
from __future__ import annotations

import torch

from .harness import Case, Harness, run_cases

OP = "embedding_stats"


def cases(h: Harness):
    items = [((2, 16), 64)] if h.smoke else [((16, 1024), 50257), ((16, 256), 8192)]
    out = []
    for shape, vocab in items:
        def build(ops, shape=shape, vocab=vocab):
            idx = torch.randint(0, vocab, shape, device=h.device)
            acc = torch.zeros(vocab, dtype=torch.float32, device=h.device)
            return lambda: ops.embedding_stats(idx, acc)
        out.append(Case(f"tokens {shape[0]}x{shape[1]} vocab {vocab}", list(shape), "int64",
                        8 * shape[0] * shape[1] + 8 * vocab, build, vocab=vocab))
    return out


def run(h: Harness) -> None:
    run_cases(h, OP, cases(h))
