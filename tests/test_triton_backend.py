"""The Triton backend inside the engine (kernels run by Triton's CPU interpreter here; natively on a GPU):
the same greedy tokens as transformers, at DCP 1 and 2, sparse and dense attention, fp32 and fp8 caches."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dcpserve.engine.llm import LLM  # noqa: E402
from dcpserve.engine.sampler import SamplingParams  # noqa: E402
from tests.hf_models import PROMPTS  # noqa: E402

NEW = 6


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks


@pytest.mark.parametrize("tp,dcp,cache,kind", [(1, 1, "auto", "v32"), (2, 2, "auto", "v32"), (2, 2, "fp8_e4m3", "v32"),
                                             (1, 1, "auto", "v32-fp8")])
def test_triton_backend_matches(hf_refs, tp, dcp, cache, kind):
    """v32-fp8 at tp=1 keeps every layer matrix in e4m3: the fp8 linear and fp8 MoE kernels."""
    ref = hf_refs[kind]
    prompts = [PROMPTS[0], PROMPTS[2]]  # 40 tokens: sparse (index_topk 16); 3 tokens: dense
    with LLM(ref.path, tp=tp, dcp=dcp, page_size=4, kv_mem_gb=0.01, dtype="float32", attention_backend="triton",
             kv_cache_dtype=cache) as llm:
        outs = [o["output_ids"] for o in llm.generate(prompts, SamplingParams(max_tokens=NEW, ignore_eos=True))]
    if cache == "auto":
        assert outs == [ref.outputs[0][:NEW], ref.outputs[2][:NEW]]
    else:  # no reference for an fp8 cache: equal to the torch backend with the same cache
        with LLM(ref.path, tp=1, dcp=1, page_size=4, kv_mem_gb=0.01, dtype="float32", kv_cache_dtype=cache) as llm:
            want = [o["output_ids"] for o in llm.generate(prompts, SamplingParams(max_tokens=NEW, ignore_eos=True))]
        assert outs == want
