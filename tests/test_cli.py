"""The command line: generate's JSON contract, capacity numbers, and bad input failing fast with a one-line
error, a non-zero exit and no rank process left behind (issue 2, items 4 and 5)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.hf_models import PROMPTS


def run_cli(*argv: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, str]:
    tag = uuid.uuid4().hex
    env = {**os.environ, "DCPSERVE_TEST_TAG": tag}
    proc = subprocess.run([sys.executable, "-m", "dcpserve", *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)
    return proc, tag


def processes_with_tag(tag: str) -> list[int]:
    """Processes still alive that inherited this run's environment (spawned ranks would)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_generate_json_last_line(hf_refs):
    ref = hf_refs["v32"]
    ids = ",".join(map(str, PROMPTS[0]))
    proc, _ = run_cli("generate", "--model-path", ref.path, "--tp", "2", "--dcp", "2", "--input-ids", ids,
                      "--max-new-tokens", "32", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["output_ids"] == ref.outputs[0]


def test_generate_prompt_on_embedded_default():
    proc, _ = run_cli("generate", "--tp", "2", "--dcp", "2", "--prompt", "Hello", "--max-new-tokens", "4",
                      "--ignore-eos")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["output_ids"]) == 4


def test_capacity_sharded_scales_by_d_replicated_matches_design():
    proc, _ = run_cli("capacity", "--model-path", "builtin:deepseek-v3.2", "--tp", "8", "--dcp", "1,2,4,8",
                      "--kv-cache-dtype", "fp8_e4m3", "--kv-mem-gb", "40", "--both-indexer-modes", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    by = {(r["dcp"], r["indexer"]): r for r in rows}
    page = 16  # default --page-size
    for d in (1, 2, 4, 8):
        sharded = by[(d, "sharded")]
        assert abs(sharded["tokens"] - d * by[(1, "sharded")]["tokens"]) <= page * d, d
        # DESIGN section 1: fp8 latent 656 B + indexer key 132 B per token per layer.
        assert sharded["bytes_per_token_per_layer_per_rank"] == pytest.approx(788 / d)
        assert by[(d, "replicated")]["bytes_per_token_per_layer_per_rank"] == pytest.approx(656 / d + 132)
    assert by[(8, "replicated")]["gain_vs_dcp1"] == pytest.approx(788 / (656 / 8 + 132), rel=1e-3)


def _mismatched(tmp_path, src: str) -> str:
    dst = tmp_path / "mismatch"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["kv_lora_rank"] = 48  # weights were saved with 32
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _llama(tmp_path) -> str:
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return str(d)


BAD = {
    "dcp-not-dividing-tp": lambda tp, ref: ["--model-path", ref, "--tp", "4", "--dcp", "3"],
    "heads-not-divisible": lambda tp, ref: ["--model-path", ref, "--tp", "3", "--dcp", "1"],
    "missing-checkpoint": lambda tp, ref: ["--model-path", str(tp / "nope"), "--tp", "2"],
    "mismatched-checkpoint": lambda tp, ref: ["--model-path", _mismatched(tp, ref), "--tp", "2", "--dcp", "2"],
    "unsupported-model-type": lambda tp, ref: ["--model-path", _llama(tp), "--tp", "2"],
    "bad-interleave": lambda tp, ref: ["--model-path", ref, "--tp", "2", "--dcp", "2", "--dcp-interleave", "3"],
    "p2p-on-cpu": lambda tp, ref: ["--model-path", ref, "--tp", "2", "--dcp", "2", "--dcp-comm", "p2p", "--device", "cpu"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_fast_with_one_line(hf_refs, tmp_path, case):
    argv = BAD[case](tmp_path, hf_refs["v32"].path)
    proc, tag = run_cli("generate", *argv, "--input-ids", "5,17,42", "--max-new-tokens", "4", timeout=90)
    assert proc.returncode != 0
    err_lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert processes_with_tag(tag) == []


def test_more_ranks_than_gpus_fails_before_starting_ranks(monkeypatch):
    """--tp above the visible GPU count: one clear start-up error (a rank used to die on 'invalid device
    ordinal' after the others had started). Planning (`validate`, as `capacity` uses it) still accepts it."""
    import torch

    from dcpserve.config import ConfigError, EngineArgs

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    EngineArgs(tp=2, dcp=2, device="cuda").check_devices()
    EngineArgs(tp=8, dcp=2, device="cuda").validate()
    with pytest.raises(ConfigError, match="--tp 4 runs one rank per GPU, but 2 CUDA GPU"):
        EngineArgs(tp=4, dcp=2, device="cuda").check_devices()


def test_attention_backend_auto_picks_triton_on_cuda_only():
    """--attention-backend auto (the default): the torch reference on CPU, the Triton kernels (and so CUDA
    graphs) on CUDA when Triton is installed and the model's dims fit them; an explicit choice wins."""
    import dataclasses
    import importlib.util

    from dcpserve.config import EngineArgs, ModelConfig
    from dcpserve.engine.worker import resolve_attention_backend
    from dcpserve.loader.tiny import default_model_path

    cfg = ModelConfig.from_pretrained(default_model_path())  # kv_lora 32, rope 16: fits the kernels
    auto = EngineArgs()
    assert auto.attention_backend == "auto"
    has_triton = importlib.util.find_spec("triton") is not None
    assert resolve_attention_backend(auto, cfg, "cpu") == "torch"
    assert resolve_attention_backend(auto, cfg, "cuda") == ("triton" if has_triton else "torch")
    assert resolve_attention_backend(auto, dataclasses.replace(cfg, qk_rope_head_dim=8), "cuda") == "torch"
    assert resolve_attention_backend(EngineArgs(attention_backend="torch"), cfg, "cuda") == "torch"
    assert resolve_attention_backend(EngineArgs(attention_backend="triton"), cfg, "cpu") == "triton"
