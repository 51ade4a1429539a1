"""The closeness check the MoE and fp8-linear kernel tests share: max abs error relative to the reference's
largest magnitude, with one tolerance for fp32 outputs and one for 16-bit outputs."""
import torch


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol32: float, tol16: float) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    scale = ref.float().abs().max().item()
    tol = tol32 if dtype == torch.float32 else tol16
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * max(scale, 1e-3), (err, scale)
