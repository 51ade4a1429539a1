"""Triton building blocks shared by the MLA attention kernels (decode, sparse decode, prefill).

* `load_latent_tile`: gather BLOCK_N latent rows (bf16/fp16/fp32, or the fp8 "656 B" format dequantized
  in registers) -> (k_lat [BLOCK_N, KV_LORA], k_pe [BLOCK_N, ROPE]) in the compute dtype.
* `attend_tile`: one online-softmax step (base-2 scores, fp32 running max / sum / accumulator).
* `finish_rows`: normalize and store out [rows, KV_LORA] and the natural-log LSE (0 / -inf where empty).
"""
from __future__ import annotations

import triton
import triton.language as tl

from dcpserve.kernels._common import fix_interpreter_scalars

fix_interpreter_scalars()

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_latent_tile(cache_ptr, rows, valid, row_stride,
                     KV_LORA: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr, QBLK: tl.constexpr,
                     BLOCK_N: tl.constexpr, CDT: tl.constexpr):
    """rows: int64 [BLOCK_N] pool rows; rows where `valid` is false are never dereferenced (read as 0)."""
    d = tl.arange(0, KV_LORA)
    e = tl.arange(0, ROPE)
    base = cache_ptr + rows * row_stride  # row_stride in elements (bytes for fp8)
    vm = valid[:, None]
    if FP8:
        NSC: tl.constexpr = KV_LORA // QBLK
        raw = tl.load(base[:, None] + d[None, :], mask=vm, other=0)
        sp = (base + KV_LORA).to(tl.pointer_type(tl.float32))
        sc = tl.load(sp[:, None] + tl.arange(0, NSC)[None, :], mask=vm, other=0.0)
        kf = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        # One fp32 scale per QBLK values: view [N, NSC, QBLK] to broadcast the scale, then flatten back.
        kf = tl.reshape(tl.reshape(kf, [BLOCK_N, NSC, QBLK]) * sc[:, :, None], [BLOCK_N, KV_LORA])
        k_lat = kf.to(CDT)
        rp = (base + KV_LORA + 4 * NSC).to(tl.pointer_type(tl.bfloat16))
        k_pe = tl.load(rp[:, None] + e[None, :], mask=vm, other=0.0).to(CDT)
    else:
        k_lat = tl.load(base[:, None] + d[None, :], mask=vm, other=0.0).to(CDT)
        k_pe = tl.load(base[:, None] + KV_LORA + e[None, :], mask=vm, other=0.0).to(CDT)
    return k_lat, k_pe


@triton.jit
def attend_tile(q_lat, q_pe, k_lat, k_pe, mask, m_i, l_i, acc, sm_scale_log2,
                CDT: tl.constexpr, PREC: tl.constexpr):
    """Scores of BLOCK_M query rows against BLOCK_N keys (masked to -inf where `mask` is false), then the
    online-softmax update. Base 2: sm_scale_log2 = scale * log2(e). Never produces NaN for empty rows."""
    s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PREC)
    s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=PREC)
    s = tl.where(mask, s * sm_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no key so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(CDT), k_lat, acc, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def finish_rows(out_ptrs, lse_ptrs, row_mask, m_i, l_i, acc):
    """out_ptrs [M, KV_LORA], lse_ptrs [M]: store acc / l and ln-LSE; empty rows get 0 and -inf."""
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(out_ptrs, out, mask=row_mask[:, None])
    tl.store(lse_ptrs, lse, mask=row_mask)
