"""dcpserve against HuggingFace transformers' own `generate` on the same checkpoint, on one GPU: what a user
without an engine would run. Builds a DeepSeek-V3.2-dimension model with `--num-layers` layers in
transformers (random init, bf16), saves it, times transformers' greedy decode, then dcpserve's, and checks
that the greedy tokens agree.

With `--fp8` the saved checkpoint is rewritten in DeepSeek's own block-fp8 format (as the official V3/V3.2
checkpoints ship) and transformers runs the bf16 values it describes (its weights replaced by the
dequantized ones); dcpserve runs it twice: keeping the weights in fp8 (the default for such a checkpoint)
and with `--quantization none` (dequantized to bf16 at load).

  python -m dcpserve.bench.hf_compare --num-layers 2 --input-len 128 --output-len 64 [--fp8] --out hf.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from dcpserve.loader.tiny import DEEPSEEK_V32_CONFIG


def build_hf(num_layers: int, path: str, fp8: bool):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    raw = {k: v for k, v in DEEPSEEK_V32_CONFIG.items()
           if k not in ("quantization_config", "rope_scaling", "rope_theta", "architectures", "model_type", "torch_dtype")}
    rope = dict(DEEPSEEK_V32_CONFIG["rope_scaling"])
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = DEEPSEEK_V32_CONFIG["rope_theta"]
    cfg = DeepseekV32Config(**{**raw, "num_hidden_layers": num_layers, "rope_parameters": rope})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV32ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    if fp8:
        from dcpserve.loader.fp8 import to_fp8_checkpoint

        model = hf_model_with_values(model, to_fp8_checkpoint(path), path + "-dequant-ref", torch.bfloat16, "cuda")
    return model


def hf_model_with_values(model, sd: dict[str, torch.Tensor], tmp: str, dtype: torch.dtype, device: str):
    """A transformers model equal to `model` but with the tensors named in `sd` (checkpoint names, e.g. the
    dequantized values of an fp8 checkpoint) in place of its own, loaded through transformers' own name
    mapping; `tmp` is a scratch directory, removed afterwards."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp)
    f = os.path.join(tmp, "model.safetensors")
    ref = load_file(f)
    ref.update({k: v.to(ref[k].dtype) for k, v in sd.items() if k in ref})
    save_file(ref, f)
    out = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def time_hf(model, ids: list[int], new: int) -> tuple[list[int], float, float]:
    inp = torch.tensor([ids], device="cuda")
    model.generation_config.eos_token_id = None
    model.generate(inp, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(inp, max_new_tokens=1, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = model.generate(inp, max_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return out[0, len(ids):].tolist(), (t1 - t0) * 1e3, (t2 - t1 - (t1 - t0)) / (new - 1) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--fp8", action="store_true", help="a DeepSeek block-fp8 checkpoint (see above)")
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    path = ns.dir or tempfile.mkdtemp(prefix="hf-v32-")
    model = build_hf(ns.num_layers, path, ns.fp8)
    ids = torch.randint(2, 129280, (ns.input_len,), generator=torch.Generator().manual_seed(0)).tolist()
    hf_ids, hf_ttft, hf_tpot = time_hf(model, ids, ns.output_len)
    del model
    torch.cuda.empty_cache()

    from dcpserve.bench.engine import first_mismatch, run_one
    from dcpserve.config import EngineArgs

    rows = {"transformers": {"ttft_ms": hf_ttft, "tpot_ms": hf_tpot, "tok_s": 1e3 / hf_tpot}}
    runs = [("dcpserve", {}), ("dcpserve-eager", {"disable_cuda_graph": True})]
    if ns.fp8:
        runs += [("dcpserve-dequantized", {"quantization": "none"})]
    for label, extra in runs:
        args = EngineArgs(model_path=path, tp=1, dcp=1, attention_backend="triton", kv_mem_gb=4.0, **extra)
        import dcpserve.bench.engine as be

        orig = be.prompts
        # The timed request uses the prompt transformers saw; warm-up requests keep their own.
        be.prompts = lambda b, n, v, s, orig=orig: [ids] if s == 0 else orig(b, n, v, s)
        r = run_one(args, label, 1, ns.input_len, ns.output_len, 0)
        rows[label] = {"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "tok_s": r.decode_tok_s,
                       "speedup_vs_transformers": hf_tpot / r.tpot_ms,
                       "first_token_mismatch": first_mismatch([hf_ids], r.output_ids)}
    gpu = torch.cuda.get_device_name(0)
    report = {"date": time.strftime("%Y-%m-%d"), "device": gpu, "num_layers": ns.num_layers, "fp8_checkpoint": ns.fp8,
              "input_len": ns.input_len, "output_len": ns.output_len, "rows": rows}
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(report, f, indent=2)
    wfmt = "fp8 block-quantized checkpoint" if ns.fp8 else "bf16"
    print(f"\n{gpu}: DeepSeek-V3.2 dims, {ns.num_layers} layers, {wfmt}, batch 1, {ns.input_len} in / {ns.output_len} out")
    print(f"{'engine':<18}{'TTFT ms':>10}{'TPOT ms':>10}{'tok/s':>10}{'speedup':>10}  greedy tokens vs transformers")
    for k, v in rows.items():
        sp = f"{v.get('speedup_vs_transformers', 1.0):.1f}x"
        mm = v.get("first_token_mismatch", None)
        eq = "-" if k == "transformers" else ("equal" if mm is None else f"differ from token {mm}")
        print(f"{k:<18}{v['ttft_ms']:>10.1f}{v['tpot_ms']:>10.3f}{v['tok_s']:>10.1f}{sp:>10}  {eq}")
    if not ns.dir:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
