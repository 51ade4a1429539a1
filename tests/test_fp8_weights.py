"""Block-fp8 layer weights (loader/fp8.py, `--quantization`): which reader keeps what, shards of whole blocks
stay fp8 with the matching slice of the scales, shards that split a block fall back to the same values
dequantized, and the engine gives the same greedy tokens at every TP/DCP size with fp8 weights."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from dcpserve.config import ConfigError, EngineArgs, ModelConfig
from dcpserve.distributed.parallel import ParallelState
from dcpserve.engine.worker import make_reader
from dcpserve.loader.fp8 import Fp8Weight, dequantize_block, quantize_block
from dcpserve.loader.reader import DummyReader, SafetensorsReader, ShardSpec
from dcpserve.model.deepseek import DeepseekForCausalLM
from tests.hf_models import PROMPTS, make_reference
from tests.test_engine import generate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An fp8 matrix [256, 384] (blocks 2 x 3) with its scales, and a bf16 matrix [256, 128]."""
    d = tmp_path_factory.mktemp("fp8ckpt")
    g = torch.Generator().manual_seed(0)
    a = quantize_block(torch.randn(256, 384, generator=g) * torch.exp(torch.randn(256, 1, generator=g)))
    b = torch.randn(256, 128, generator=g).to(torch.bfloat16)
    save_file({"a.weight": a.q, "a.weight_scale_inv": a.scale, "b.weight": b}, os.path.join(d, "model.safetensors"))
    return str(d), a, b


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_checkpoint_fp8_kept_with_sliced_scales(ckpt):
    path, a, _ = ckpt
    r = SafetensorsReader(path, torch.float32, CPU, (128, 128), keep_fp8=True)
    full = r.get_linear("a.weight", (256, 384))
    assert isinstance(full, Fp8Weight) and torch.equal(_u8(full.q), _u8(a.q)) and torch.equal(full.scale, a.scale)
    rows = r.get_linear("a.weight", (256, 384), ShardSpec(0, 1, 2))  # rows 128:256 = block row 1
    assert torch.equal(_u8(rows.q), _u8(a.q[128:])) and torch.equal(rows.scale, a.scale[1:])
    cols = r.get_linear("a.weight", (256, 384), ShardSpec(1, 2, 3))  # columns 256:384 = block column 2
    assert torch.equal(_u8(cols.q), _u8(a.q[:, 256:])) and torch.equal(cols.scale, a.scale[:, 2:])
    # Rows 64:128 split block row 0: dequantized, the same values the fp8 form describes.
    split = r.get_linear("a.weight", (256, 384), ShardSpec(0, 1, 4))
    assert isinstance(split, torch.Tensor) and split.dtype == torch.float32
    assert torch.equal(split, dequantize_block(a.q, a.scale, a.block)[64:128])
    # get() and keep_fp8=False always dequantize.
    assert torch.equal(r.get("a.weight", (256, 384)), dequantize_block(a.q, a.scale, a.block))
    plain = SafetensorsReader(path, torch.float32, CPU, (128, 128)).get_linear("a.weight", (256, 384))
    assert torch.equal(plain, dequantize_block(a.q, a.scale, a.block))


def test_full_precision_quantized_at_load_from_full_blocks(ckpt):
    path, _, b = ckpt
    r = SafetensorsReader(path, torch.float32, CPU, None, quantize=True)
    want = quantize_block(b.float())
    half = r.get_linear("b.weight", (256, 128), ShardSpec(0, 0, 2))
    assert torch.equal(_u8(half.q), _u8(want.q[:128])) and torch.equal(half.scale, want.scale[:1])
    quarter = r.get_linear("b.weight", (256, 128), ShardSpec(0, 3, 4))  # splits block row 1
    assert torch.equal(quarter, dequantize_block(want.q, want.scale, want.block)[192:])
    assert isinstance(SafetensorsReader(path, torch.float32, CPU, None).get_linear("b.weight", (256, 128)),
                      torch.Tensor)


def test_dummy_weights_same_at_every_tp_size():
    r = DummyReader(torch.float32, CPU, seed=3, quantize=True)
    full = r.get_linear("model.layers.0.mlp.down_proj.weight", (256, 512))
    parts = [r.get_linear("model.layers.0.mlp.down_proj.weight", (256, 512), ShardSpec(1, i, 2)) for i in range(2)]
    assert torch.equal(_u8(torch.cat([p.q for p in parts], 1)), _u8(full.q))
    assert torch.equal(torch.cat([p.scale for p in parts], 1), full.scale)
    assert isinstance(DummyReader(torch.float32, CPU).get_linear("x.weight", (8, 8)), torch.Tensor)


@pytest.mark.parametrize("quantization,load_format,keep,quantize", [
    ("auto", "auto", True, False), ("none", "auto", False, False), ("fp8", "auto", True, True),
    ("auto", "dummy", None, False), ("fp8", "dummy", None, True)])
def test_quantization_flag_picks_reader(ckpt, quantization, load_format, keep, quantize):
    cfg = ModelConfig.from_dict({"model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 4, "vocab_size": 32, "intermediate_size": 64,
                                 "kv_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
                                 "v_head_dim": 16, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
                                 "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    args = EngineArgs(model_path=ckpt[0], quantization=quantization, load_format=load_format)
    r = make_reader(args, cfg, torch.float32, CPU)
    assert r.quantize == quantize
    if keep is not None:
        assert r.keep_fp8 == keep


def test_bad_quantization_is_a_clear_error():
    with pytest.raises(ConfigError, match="--quantization must be one of auto, fp8, none"):
        EngineArgs(quantization="int4").validate()


def test_fp8_weights_same_tokens_at_every_dcp_size(hf_refs):
    """v32-fp8 keeps every layer matrix e4m3 at tp=1; at tp=2 and 4 its tiny shards split blocks and load
    dequantized: the same values, hence the same greedy tokens (and transformers' on the dequantized model)."""
    ref = hf_refs["v32-fp8"]
    base = generate(ref.path, PROMPTS, tp=1, dcp=1)
    assert base == [o[:24] for o in ref.outputs]
    assert generate(ref.path, PROMPTS, tp=2, dcp=2, dcp_comm="a2a") == base
    assert generate(ref.path, PROMPTS, tp=1, dcp=1, quantization="none") == base


@pytest.fixture(scope="module")
def ref_b16(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_reference("v32-fp8b16", str(tmp_path_factory.mktemp("hf-b16")))


def test_tp_shards_of_whole_blocks_stay_fp8_and_match_transformers(ref_b16):
    """With 16x16 blocks the tiny model's tp=2 shards (row- and column-parallel, dense MLP and experts) cover
    whole blocks: each rank keeps e4m3 shards with the matching slice of the scales, as real DeepSeek
    checkpoints do at tp <= 8. Greedy tokens at tp=1 and at tp=2 with DCP2 equal transformers' on the
    dequantized model."""
    cfg = ModelConfig.from_pretrained(ref_b16.path)
    model = DeepseekForCausalLM(cfg, ParallelState(rank=1, tp_size=2, dcp_size=2, device=CPU))
    model.load(make_reader(EngineArgs(model_path=ref_b16.path), cfg, torch.float32, CPU))
    fp8 = {n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    for part in ("self_attn.q_b_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "mlp.w13", "mlp.w2",
                 "mlp.shared.down_proj"):
        assert any(part in n for n in fp8), (part, sorted(fp8))
    want = [o[:24] for o in ref_b16.outputs]
    assert generate(ref_b16.path, PROMPTS, tp=1, dcp=1) == want
    assert generate(ref_b16.path, PROMPTS, tp=2, dcp=2, dcp_comm="a2a") == want
