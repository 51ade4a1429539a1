"""The offline engine benchmark times what it says: the whole batch decodes together, and the decode-step
time comes from steps that decoded every sequence (no prefill inside)."""
from __future__ import annotations

import math

from dcpserve.bench.engine import batch_args, run_one
from dcpserve.config import EngineArgs


def test_batch_larger_than_running_slots_still_decodes_together():
    args = EngineArgs(model_path="builtin:tiny-v3.2", load_format="dummy", tp=1, dcp=1, max_running_requests=2,
                      kv_mem_gb=0.01, page_size=4)
    assert batch_args(args, 3).max_running_requests == 3
    assert batch_args(args, 2) is args
    r = run_one(args, "t", batch=3, input_len=12, output_len=5, seed=0, warmup=False)
    assert [len(o) for o in r.output_ids] == [5, 5, 5]
    # With 2 running slots and no lift, no step would decode all 3 sequences and this would be NaN.
    assert math.isfinite(r.decode_step_ms) and r.decode_step_ms > 0
    assert r.tpot_ms > 0 and r.ttft_ms > 0
