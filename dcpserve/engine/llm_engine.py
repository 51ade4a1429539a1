"""The driver: owns the scheduler and the rank processes, turns requests into steps and steps into tokens.
The HTTP server and the offline `LLM` both drive this class."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from dcpserve.config import ConfigError, EngineArgs, ModelConfig
from dcpserve.distributed.launcher import RankGroup
from dcpserve.engine.sampler import SamplingParams
from dcpserve.engine.scheduler import ScheduledStep, Scheduler, Sequence, Status
from dcpserve.engine.worker import FLUSH, StepRequest
from dcpserve.kv.allocator import PageAllocator
from dcpserve.kv.layout import SlotLayout

log = logging.getLogger("dcpserve")


@dataclass
class StepOutput:
    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logits: torch.Tensor | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # computed by prefill steps (recomputation after preemption included)
    decode_tokens: int = 0
    steps_ahead: int = 0  # decode steps sent before their predecessor's tokens were read (overlap scheduling)


def load_model_config(args: EngineArgs) -> ModelConfig:
    if args.model_path is None:
        from dcpserve.loader.tiny import default_model_path

        args.model_path = default_model_path()
    elif args.model_path.startswith("builtin:"):
        from dcpserve.loader.tiny import resolve_builtin

        args.model_path = resolve_builtin(args.model_path)
    cfg = ModelConfig.from_pretrained(args.model_path)
    if args.num_layers is not None:
        cfg.num_hidden_layers = args.num_layers
        cfg.first_k_dense_replace = min(cfg.first_k_dense_replace, args.num_layers)
    return cfg


class LLMEngine:
    def __init__(self, args: EngineArgs, record_logits: bool = False):
        args.validate()
        self.args = args
        self.cfg = load_model_config(args)
        args.validate(self.cfg)
        args.check_devices()
        self.record_logits = record_logits
        self.ranks = RankGroup(args, self.cfg)
        info = self.ranks.info
        if info.num_pages < 1:
            self.ranks.close()
            raise ConfigError("no room for even one KV page: raise --kv-mem-gb / --mem-fraction-static or lower --page-size")
        self.layout = SlotLayout(args.page_size, args.dcp, args.dcp_interleave)
        self.allocator = PageAllocator(info.num_pages, self.layout.global_page_slots, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, args.max_running_requests, args.chunked_prefill_size)
        self.capacity_tokens = info.tokens
        self.context_length = args.context_length or self.cfg.max_position_embeddings
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self._forget: list[str] = []
        self._inflight: ScheduledStep | None = None  # a decode step sent ahead whose tokens are not yet read
        log.info("engine ready: tp=%d dcp=%d, %d KV pages (%d tokens), weights %.2f GB per rank (%d fp8 "
                 "matrices) loaded in %.1f s on %s, %s attention backend, %s DCP collectives", args.tp, args.dcp,
                 info.num_pages, info.tokens, info.weight_gb, info.fp8_weights, info.load_s, info.device,
                 info.attention_backend, info.dcp_comm)

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, req_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if req_id in self.seqs:
            raise ValueError(f"duplicate request id {req_id!r}")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.cfg.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.context_length:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length {self.context_length}")
        if total > self.capacity_tokens:
            raise ValueError(f"prompt + max_tokens ({total}) exceeds the KV capacity of {self.capacity_tokens} tokens")
        seq = Sequence(req_id, list(prompt_ids), params, arrival=time.time())
        self.seqs[req_id] = seq
        self.scheduler.add(seq)

    def abort(self, req_id: str) -> None:
        seq = self.seqs.pop(req_id, None)
        if seq is not None and seq.status != Status.FINISHED:
            self.scheduler.finish(seq, "abort")
            self._forget.append(req_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step and return its tokens. With overlap scheduling (the default), a decode step's
        successor is planned and sent before this step's tokens are awaited; it stays in flight across calls."""
        step = self._inflight or self.scheduler.schedule()
        if step is None:
            return []
        nxt = None if self.args.disable_overlap_schedule else self.scheduler.schedule_ahead(step, self._finishes_next)
        if step is not self._inflight:
            self._send(step, hold=nxt is not None)
        if nxt is not None:
            self._send(nxt, hold=True)
            self.stats.steps_ahead += 1
        elif self._inflight is not None:
            self.ranks.send(FLUSH)
        self._inflight = nxt
        outs = self._complete(step, *self._collect())
        if self._inflight is not None and all(s.status == Status.FINISHED for s in self._inflight.seqs):
            self.ranks.send(FLUSH)  # every sequence of the step in flight has ended: drop its tokens now
            self._collect()
            self._inflight = None
        return outs

    def _send(self, step: ScheduledStep, hold: bool) -> None:
        self.ranks.send(StepRequest(step.plan, step.samples, want_logits=self.record_logits,
                                    forget=tuple(self._forget), hold=hold))
        self._forget = []

    def _collect(self) -> tuple[list[int | None], torch.Tensor | None]:
        # A rank that hangs (rather than dies) must not block the caller forever.
        _, tokens, logits = self.ranks.collect(timeout=max(self.args.dist_timeout_s, 300))
        return tokens, logits

    def _complete(self, step: ScheduledStep, tokens: list[int | None], logits: torch.Tensor | None) -> list[StepOutput]:
        self.scheduler.complete(step, tokens)
        self._account(step)
        outs = []
        for i, (seq, tok) in enumerate(zip(step.seqs, tokens)):
            if tok is None or seq.status == Status.FINISHED:
                continue
            reason = self._stop_reason(seq, tok)
            if reason:
                self.scheduler.finish(seq, reason)
                self.seqs.pop(seq.req_id, None)
                self._forget.append(seq.req_id)
            outs.append(StepOutput(seq.req_id, [tok], reason is not None, reason,
                                   logits[i] if logits is not None else None))
        return outs

    def _finishes_next(self, seq: Sequence) -> bool:
        """Whether the token now being computed for `seq` surely ends it (length limits; a stop token
        cannot be foreseen and costs one discarded step)."""
        return len(seq.output_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.context_length

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and tok in self.cfg.eos_token_ids:
            return "stop"
        if tok in p.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= p.max_tokens:
            return "length"
        if seq.num_tokens >= self.context_length:
            return "length"
        return None

    def _account(self, step) -> None:
        s = self.stats
        s.steps += 1
        n = sum(p.num_new for p in step.plan.seqs)
        if step.plan.is_decode:
            s.decode_tokens += n
        else:
            s.prefill_tokens += n

    def alive(self) -> bool:
        return self.ranks.alive()

    def kv_usage(self) -> float:
        return self.allocator.num_used / max(self.allocator.num_pages, 1)

    def shutdown(self) -> None:
        self.ranks.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
