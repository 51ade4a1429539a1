"""Overlap scheduling (a decode step planned and sent before its predecessor's tokens are read) changes
nothing a user sees: the same tokens, finish reasons and logits as waiting for every step, including
sequences that stop on a token nobody could foresee, requests that join or abort mid-run, seeded sampling
and DCP; every page is free at the end and no step is left in flight."""
from __future__ import annotations

import torch

from dcpserve.engine.llm import LLM
from dcpserve.engine.sampler import SamplingParams
from tests.hf_models import ENGINE_DEFAULTS, PROMPTS

KW = {**ENGINE_DEFAULTS, "page_size": 4, "kv_mem_gb": 0.01}


def run(path, prompts, params, overlap: bool, arrival=None, **kw):
    with LLM(path, record_logits=True, disable_overlap_schedule=not overlap, **{**KW, **kw}) as llm:
        outs = llm.generate(prompts, params, arrival_steps=arrival)
        eng = llm.engine
        assert eng.allocator.num_used == 0, "KV pages leaked"
        assert eng._inflight is None, "a step was left in flight"
        return outs, eng.stats.steps_ahead


def test_overlap_matches_sequential_with_unforeseen_stops(hf_refs):
    path = hf_refs["v32"].path
    greedy = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (24, 5, 11)]
    first, _ = run(path, PROMPTS, greedy, overlap=False, tp=1, dcp=1)
    # Stop request 0 on its 7th token: the engine learns it only after the following step was sent.
    stop = first[0]["output_ids"][6]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(stop,)), greedy[1], greedy[2]]
    base, ahead0 = run(path, PROMPTS, params, overlap=False, arrival=[0, 2, 5], tp=2, dcp=2)
    got, ahead = run(path, PROMPTS, params, overlap=True, arrival=[0, 2, 5], tp=2, dcp=2)
    assert ahead0 == 0 and ahead > 10, "overlap scheduling did not engage"
    assert base[0]["finish_reason"] == "stop" and len(base[0]["output_ids"]) < 24
    for b, g in zip(base, got):
        assert g["output_ids"] == b["output_ids"]
        assert g["finish_reason"] == b["finish_reason"]
        # A late joiner is prefilled one step later than without overlap (a step was already in flight),
        # so batches differ and fp32 sums may round differently: close, not bitwise.
        torch.testing.assert_close(torch.stack(g["logits"]), torch.stack(b["logits"]), rtol=1e-4, atol=1e-4)


def test_overlap_seeded_sampling_matches(hf_refs):
    path = hf_refs["v32"].path
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, top_p=0.9, top_k=50, seed=3)
    base, _ = run(path, PROMPTS[:2], params, overlap=False, tp=1, dcp=1)
    got, ahead = run(path, PROMPTS[:2], params, overlap=True, tp=2, dcp=2)
    assert ahead > 0
    assert [g["output_ids"] for g in got] == [b["output_ids"] for b in base]


def test_abort_while_a_step_is_in_flight(hf_refs):
    """Aborting a request whose next step is already on the ranks frees its pages; the other request's
    tokens are unchanged."""
    path = hf_refs["v32"].path
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    alone, _ = run(path, [PROMPTS[1]], params, overlap=False, tp=1, dcp=1)
    with LLM(path, tp=2, dcp=2, **KW) as llm:
        eng = llm.engine
        eng.add_request("a", PROMPTS[0], params)
        eng.add_request("b", PROMPTS[1], params)
        out: dict[str, list[int]] = {"a": [], "b": []}
        while eng._inflight is None:
            for o in eng.step():
                out[o.req_id] += o.new_token_ids
        eng.abort("a")
        while eng.has_unfinished() or eng._inflight is not None:
            for o in eng.step():
                out[o.req_id] += o.new_token_ids
        assert eng._inflight is None
        assert eng.allocator.num_used == 0
        assert 0 < len(out["a"]) < 16
        assert out["b"] == alone[0]["output_ids"]
