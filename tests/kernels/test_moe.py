"""Grouped-GEMM MoE kernel (dcpserve/kernels/moe.py) against its torch reference and the engine's experts_loop.

On CPU the kernels run in Triton's interpreter on tiny shapes; on a GPU machine they run on CUDA."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.kernels.moe import (  # noqa: E402
    MoEConfig, MoEScales, fused_moe, fused_moe_ref, moe_align)
from dcpserve.loader.fp8 import quantize_block  # noqa: E402
from dcpserve.model.moe import expert_weights, experts_loop, route  # noqa: E402
from tests.kernels._close import assert_rel_close  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = MoEConfig(block_m=16, block_n1=16, block_n2=32, block_k=32, num_warps=4, num_stages=2)


def _weights(e: int, hd: int, inter: int, dtype: torch.dtype, gen: torch.Generator):
    w13 = (torch.randn(e, 2 * inter, hd, generator=gen) * hd ** -0.5).to(dtype)
    w2 = (torch.randn(e, hd, inter, generator=gen) * inter ** -0.5).to(dtype)
    return w13.to(DEV), w2.to(DEV)


def _routing(t: int, k: int, experts: list[int], gen: torch.Generator):
    """Each token picks k distinct experts from `experts` (the others receive no tokens)."""
    pool = torch.tensor(experts)
    ids = torch.stack([pool[torch.randperm(len(experts), generator=gen)[:k]] for _ in range(t)])
    w = torch.rand(t, k, generator=gen) + 0.1
    return w.to(DEV), ids.to(DEV)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert_rel_close(out, ref, dtype, tol32=1e-5, tol16=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,experts", [
    (1, 2, [3, 5]),                  # T=1
    (5, 3, [0, 2, 4, 5, 7]),         # experts 1, 3, 6 receive no tokens
    (40, 2, [1, 6]),                 # 40 pairs per expert: several BLOCK_M blocks each
])
def test_fused_moe_matches_ref(dtype: torch.dtype, t: int, k: int, experts: list[int]) -> None:
    gen = torch.Generator().manual_seed(t * 10 + k)
    hd, inter, e = 80, 24, 8  # neither a multiple of the tile sizes: masked edges in N and K
    w13, w2 = _weights(e, hd, inter, dtype, gen)
    x = torch.randn(t, hd, generator=gen).to(dtype).to(DEV)
    tw, ids = _routing(t, k, experts, gen)
    out = fused_moe(x, w13, w2, tw, ids, config=SMALL)
    _assert_close(out, fused_moe_ref(x, w13, w2, tw, ids), dtype)


def test_fused_moe_default_config_int32_ids() -> None:
    gen = torch.Generator().manual_seed(1)
    w13, w2 = _weights(4, 64, 32, torch.float32, gen)
    x = torch.randn(6, 64, generator=gen).to(DEV)
    tw, ids = _routing(6, 2, [0, 1, 3], gen)
    out = fused_moe(x, w13, w2, tw, ids.to(torch.int32))
    _assert_close(out, fused_moe_ref(x, w13, w2, tw, ids), torch.float32)


def test_fused_moe_default_config_many_tokens_per_expert() -> None:
    """> 16 pairs per expert selects the BLOCK_M 64 / BLOCK_K 64 configuration."""
    gen = torch.Generator().manual_seed(4)
    w13, w2 = _weights(8, 96, 48, torch.bfloat16, gen)
    x = torch.randn(40, 96, generator=gen).to(torch.bfloat16).to(DEV)
    tw, ids = _routing(40, 2, [1, 6], gen)
    out = fused_moe(x, w13, w2, tw, ids)
    _assert_close(out, fused_moe_ref(x, w13, w2, tw, ids), torch.bfloat16)


def test_moe_align_layout() -> None:
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]], device=DEV)
    sorted_ids, block_expert = moe_align(ids, 5, 4)
    n = ids.numel()
    # Pairs (t*k + slot) -> experts [2, 0, 2, 3, 0, 2]. Expert 0: pairs 1, 4; expert 2: pairs 0, 2, 5;
    # expert 3: pair 3; each run padded to a multiple of 4 with n (= no pair).
    assert sorted_ids.tolist()[:12] == [1, 4, n, n, 0, 2, 5, n, 3, n, n, n]
    assert block_expert.tolist()[:3] == [0, 2, 3]
    assert all(b == -1 for b in block_expert.tolist()[3:]) and (sorted_ids[12:] == n).all()


def test_ref_equals_engine_moe_experts() -> None:
    """fused_moe_ref mirrors the engine's experts_loop; routing from the engine's own `route`."""
    gen = torch.Generator().manual_seed(2)
    t, hd, inter, e = 9, 32, 16, 8
    cfg = SimpleNamespace(n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=True,
                          routed_scaling_factor=2.5)
    w13, w2 = _weights(e, hd, inter, torch.float32, gen)
    x = torch.randn(t, hd, generator=gen)
    tw, ids = route(torch.randn(t, e, generator=gen), torch.randn(e, generator=gen) * 0.1, cfg)
    engine = experts_loop(x, w13.cpu(), w2.cpu(), tw, ids)
    torch.testing.assert_close(fused_moe_ref(x, w13.cpu(), w2.cpu(), tw, ids), engine, rtol=1e-5, atol=1e-5)
    out = fused_moe(x.to(DEV), w13, w2, tw.to(DEV), ids.to(DEV), config=SMALL)
    _assert_close(out.cpu(), engine, torch.float32)


def _fp8_experts(e: int, hd: int, inter: int, block: tuple[int, int], gen: torch.Generator):
    """Per-expert gate, up and down quantized on their own (as in a DeepSeek checkpoint), stacked like MoE.load."""
    mats = [[torch.randn(inter, hd, generator=gen) * torch.exp(torch.randn(inter, 1, generator=gen)) * hd ** -0.5,
             torch.randn(inter, hd, generator=gen) * hd ** -0.5,
             torch.randn(hd, inter, generator=gen) * inter ** -0.5] for _ in range(e)]
    qs = [[quantize_block(m, block) for m in ms] for ms in mats]
    w13 = torch.stack([torch.cat([g.q, u.q]) for g, u, _ in qs]).to(DEV)
    w2 = torch.stack([d.q for _, _, d in qs]).to(DEV)
    scales = MoEScales(torch.stack([torch.cat([g.scale, u.scale]) for g, u, _ in qs]).to(DEV),
                       torch.stack([d.scale for _, _, d in qs]).to(DEV), block)
    return w13, w2, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,experts,inter", [(1, 2, [3, 5], 24), (7, 3, [0, 2, 4, 5, 7], 40), (40, 2, [1, 6], 64)])
def test_fused_moe_fp8_weights(dtype, t, k, experts, inter):
    """e4m3 experts with block scales (hidden 80 and inter 24/40: ragged against the 32-wide blocks; gate and up
    blocks apart) against the reference on the dequantized weights, and against the engine's own fp8 loop."""
    gen = torch.Generator().manual_seed(t + inter)
    hd, e = 80, 8
    w13, w2, scales = _fp8_experts(e, hd, inter, (32, 32), gen)
    x = torch.randn(t, hd, generator=gen).to(dtype).to(DEV)
    tw, ids = _routing(t, k, experts, gen)
    out = fused_moe(x, w13, w2, tw, ids, config=SMALL, scales=scales)
    d13, d2 = (torch.stack(ws) for ws in zip(*(expert_weights(w13, w2, scales, i, dtype) for i in range(e))))
    _assert_close(out, fused_moe_ref(x, d13, d2, tw, ids), dtype)
    engine = experts_loop(x, w13, w2, tw, ids, scales)
    _assert_close(out, engine, dtype)


def test_fused_moe_fp8_needs_scales():
    gen = torch.Generator().manual_seed(9)
    w13, w2, scales = _fp8_experts(4, 64, 32, (32, 32), gen)
    x = torch.randn(2, 64, generator=gen).to(DEV)
    tw, ids = _routing(2, 2, [0, 1], gen)
    with pytest.raises(ValueError, match="scales"):
        fused_moe(x, w13, w2, tw, ids, config=SMALL)
    bad = MoEScales(scales.w13[:, :1], scales.w2, scales.block)
    with pytest.raises(ValueError, match="scales"):
        fused_moe(x, w13, w2, tw, ids, config=SMALL, scales=bad)
