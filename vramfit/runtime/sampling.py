"""Token sampling with llama.cpp's default order: penalties, top-k, top-p, min-p, temperature, draw.

temperature <= 0 is greedy (argmax after penalties). A seeded torch.Generator makes draws repeatable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # <= 0 disables
    top_p: float = 0.95  # >= 1 disables
    min_p: float = 0.05  # <= 0 disables
    repeat_penalty: float = 1.0  # 1 disables; divides positive logits, multiplies negative ones
    repeat_last_n: int = 64  # window of recent tokens the penalties look at (-1: all)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_p <= 1 or not 0 <= self.min_p <= 1:
            raise ValueError("top_p and min_p must be within [0, 1]")


GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits (n_vocab,) float32 for the next token; history = tokens so far (prompt + generated)."""
        logits = self.penalize(logits.clone(), history)
        if self.p.temperature <= 0:
            return int(logits.argmax())
        return self.draw(self.truncate(logits))

    def penalize(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        p = self.p
        if p.repeat_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            return logits
        window = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :] if p.repeat_last_n else []
        counts = Counter(window)
        if not counts:
            return logits
        ids = torch.tensor(list(counts), dtype=torch.long)
        n = torch.tensor(list(counts.values()), dtype=torch.float32)
        sel = logits[ids]
        sel = torch.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        logits[ids] = sel - n * p.frequency_penalty - p.presence_penalty
        return logits

    def truncate(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (candidate ids, their logits / temperature), sorted by logit, after k/p/min-p cuts."""
        p = self.p
        k = logits.numel() if p.top_k <= 0 else min(p.top_k, logits.numel())
        vals, ids = torch.topk(logits, k)
        probs = torch.softmax(vals, 0)
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int((probs.cumsum(0) < p.top_p).sum()) + 1
            vals, ids, probs = vals[:keep], ids[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = int((probs >= p.min_p * probs[0]).sum())
            vals, ids = vals[: max(keep, 1)], ids[: max(keep, 1)]
        return ids, vals / p.temperature

    def draw(self, cand: tuple[torch.Tensor, torch.Tensor]) -> int:
        ids, scaled = cand
        probs = torch.softmax(scaled, 0)
        return int(ids[torch.multinomial(probs, 1, generator=self.gen)])
