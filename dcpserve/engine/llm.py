"""Offline generation: `LLM(model_path=..., tp=2, dcp=2).generate([[5, 17, 42]], SamplingParams(...))`."""
from __future__ import annotations

import os
import uuid
from dataclasses import fields

from dcpserve.config import EngineArgs
from dcpserve.engine.llm_engine import LLMEngine
from dcpserve.engine.sampler import SamplingParams


class LLM:
    def __init__(self, model_path: str | None = None, record_logits: bool = False, **kwargs):
        names = {f.name for f in fields(EngineArgs)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        self.args = EngineArgs(model_path=model_path, **kwargs)
        self.engine = LLMEngine(self.args, record_logits=record_logits)
        self.tokenizer = load_tokenizer(self.args.model_path)

    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams] | None = None,
                 arrival_steps: list[int] | None = None) -> list[dict]:
        """Generate for every prompt with continuous batching. `arrival_steps[i]` delays prompt i until that
        many engine steps have run (to exercise requests joining a running batch)."""
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self._encode(p) for p in prompts]
        arrival = arrival_steps or [0] * len(prompts)
        rids = [uuid.uuid4().hex for _ in prompts]
        results = {r: {"output_ids": [], "logits": [], "finish_reason": None} for r in rids}
        pending = sorted(range(len(prompts)), key=lambda i: arrival[i])
        step = 0
        while pending or self.engine.has_unfinished():
            while pending and arrival[pending[0]] <= step:
                i = pending.pop(0)
                self.engine.add_request(rids[i], ids[i], plist[i])
            for out in self.engine.step():
                r = results[out.req_id]
                r["output_ids"] += out.new_token_ids
                if out.logits is not None:
                    r["logits"].append(out.logits)
                if out.finished:
                    r["finish_reason"] = out.finish_reason
            step += 1
        res = [results[r] for r in rids]
        if self.tokenizer is not None:
            for r in res:
                r["text"] = self.tokenizer.decode(r["output_ids"])
        return res

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids")
            return self.tokenizer.encode(prompt).ids
        return list(prompt)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def load_tokenizer(model_path: str | None):
    if not model_path:
        return None
    path = os.path.join(model_path, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)
