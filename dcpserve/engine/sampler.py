"""Token sampling on rank 0: greedy (temperature 0) or temperature / top-k / top-p with a per-request
seeded generator, so a seeded request gives the same tokens whatever else shares its batch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError("temperature must be a finite number >= 0")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError("seed must fit in 64 bits")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError("top_k must be -1 (off) or >= 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


@dataclass
class SampleSpec:
    """What rank 0 needs to sample one sequence's next token (travels in the step plan)."""

    req_id: str
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    step: int  # tokens this request has sampled so far (advances its generator deterministically)


class Sampler:
    def __init__(self, fused: bool = False) -> None:
        self.generators: dict[str, torch.Generator] = {}
        self.fused = fused  # the Triton argmax (kernels/argmax.py): torch's takes 27 us for one 129K row

    def forget(self, req_id: str) -> None:
        self.generators.pop(req_id, None)

    def sample(self, logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
        """Token ids [len(specs)] on the logits' device. Nothing here waits for the device, so a step's
        sampling can queue behind its forward while the host moves on (overlap scheduling)."""
        if self.fused:
            from dcpserve.kernels.argmax import argmax

            out = argmax(logits)
        else:
            out = logits.argmax(-1)
        for i, s in enumerate(specs):
            if s.temperature > 0:
                out[i] = self._sample_one(logits[i].float(), s)
        return out

    def _sample_one(self, logits: torch.Tensor, s: SampleSpec) -> torch.Tensor:
        logits = logits / s.temperature
        if s.top_k > 0:
            kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if s.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            drop = sp.cumsum(0) - sp > s.top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        gen = self._generator(s, logits.device)
        return torch.multinomial(probs, 1, generator=gen)[0]

    def _generator(self, s: SampleSpec, device: torch.device) -> torch.Generator | None:
        if s.seed is None:
            return None
        g = self.generators.get(s.req_id)
        if g is None or s.step == 0:
            g = torch.Generator(device=device)
            g.manual_seed(s.seed)
            self.generators[s.req_id] = g
        return g
