"""DCPSERVE_PROFILE_DIR: rank 0 writes a kernel table, a Chrome trace and a host cProfile of the chosen
phase's step window (decode by default, prefill with DCPSERVE_PROFILE_PHASE=prefill); bad settings fail."""
from __future__ import annotations

import json

import pytest

from dcpserve.engine.llm import LLM
from dcpserve.engine.sampler import SamplingParams
from dcpserve.engine.worker import StepProfiler
from tests.hf_models import ENGINE_DEFAULTS, PROMPTS


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_profiles_the_chosen_phase(hf_refs, tmp_path, monkeypatch, phase):
    monkeypatch.setenv("DCPSERVE_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("DCPSERVE_PROFILE_PHASE", phase)
    monkeypatch.setenv("DCPSERVE_PROFILE_STEPS", "1:2")
    with LLM(hf_refs["v32"].path, tp=2, dcp=2, page_size=4, kv_mem_gb=0.01, **ENGINE_DEFAULTS) as llm:
        for p in PROMPTS:  # one request at a time: one prefill step each, then its decode steps
            llm.generate([p], SamplingParams(max_tokens=4, ignore_eos=True))
    (table,) = tmp_path.glob("profile_*.txt")
    assert table.read_text().startswith(f"per {phase} step:")
    (trace,) = tmp_path.glob("trace_*.json")
    assert json.loads(trace.read_text())["traceEvents"]
    (host,) = tmp_path.glob("host_*.txt")
    assert "function calls" in host.read_text()


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="DCPSERVE_PROFILE_PHASE"):
        StepProfiler("/tmp", "prefil")


def test_idle_gaps_counts_time_no_kernel_runs():
    from dcpserve.engine.worker import idle_gaps

    # Two streams overlap (0-10 and 5-20), then the GPU waits 30 us, then 5 us.
    out = idle_gaps([(5.0, 20.0, "b"), (0.0, 10.0, "a"), (50.0, 60.0, "nccl"), (65.0, 70.0, "c")])
    first, *rest = out.splitlines()
    assert first.startswith("GPU span 0.07 ms, idle 0.04 ms (50%)")
    assert rest[0].split() == ["30.0", "0.05", "nccl"] and rest[1].split() == ["5.0", "0.07", "c"]
