"""The fused GPTQ block kernel (fused.py), run on the CPU by Triton's interpreter, against the eager loop it
replaces on GPUs. The same arithmetic per element; only the order of float operations inside an update may
differ, so codes agree almost everywhere and GPTQ's loss agrees to float precision."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported: run kernels on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is in the dev extra (make install)")

from dscompress.compress.gptq import batched, fused  # noqa: E402
from dscompress.compress.gptq.math import inverse_hessian_factor, visiting_order  # noqa: E402
from dscompress.quant.primitives import max_code, minmax_qparams  # noqa: E402


def problem(E: int, out_f: int, in_f: int, gs: int, sym: bool, seed: int = 0):
    """Weights and inverse-Hessian factors in visiting order, as batched.solve_static receives them."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, out_f, in_f, generator=g) * 0.02
    X = torch.randn(E, 400, in_f, generator=g) * torch.linspace(0.1, 3, in_f)
    H = 2 * X.transpose(1, 2) @ X / 400
    scale, zero = minmax_qparams(W, 4, gs, sym)
    perm = torch.stack([visiting_order(h.diagonal(), gs, "static") for h in H])
    W = torch.gather(W, 2, perm[:, None, :].expand_as(W))
    Hp = torch.stack([h[p][:, p] for h, p in zip(H, perm, strict=True)])
    Hinv = torch.stack([inverse_hessian_factor(h, 0.01)[0] for h in Hp])
    return W, Hinv, perm // gs, scale, zero


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("E", "in_f", "block"), [(1, 256, 128), (3, 320, 128), (2, 384, 256)])
def test_fused_block_kernel_matches_eager_loop(sym, E, in_f, block):
    """Dense (E = 1) and batched experts, a last block shorter than the block size (320 = 2 x 128 + 64), block 256."""
    W, Hinv, groups, scale, zero = problem(E, 40, in_f, 64, sym)
    WT = W.transpose(1, 2).contiguous()
    scale_t, zero_t = scale.transpose(1, 2), zero.transpose(1, 2).float()
    ref_q, ref_loss = batched._solve_eager(WT.clone(), Hinv, groups, scale_t, zero_t, 4, block)
    ref_q = ref_q.transpose(1, 2)  # (E, in, out), as the kernel's
    got_q, got_loss = fused.solve_static(WT.clone(), Hinv, groups, scale_t, zero_t, 4, block)
    codes_ref = torch.round(ref_q / scale_t.gather(1, groups[:, :, None].expand_as(ref_q)))
    codes_got = torch.round(got_q / scale_t.gather(1, groups[:, :, None].expand_as(got_q)))
    assert (codes_ref == codes_got).float().mean() > 0.995
    assert torch.allclose(got_loss, ref_loss, rtol=1e-3)


def test_without_error_feedback_the_kernel_is_round_to_nearest_even():
    """Hinv = I leaves no error to spread, so each column is plain rounding on its grid; weights placed exactly
    half-way between two codes must round to the even code, as torch.round (and the eager loop) does."""
    E, out_f, in_f, gs = 1, 16, 128, 64
    W = torch.randn(E, out_f, in_f) * 0.02
    scale, zero = minmax_qparams(W, 4, gs, True)
    half = (torch.randint(-6, 6, (E, out_f, in_f)).float() + 0.5) * scale.repeat_interleave(gs, dim=2)
    W[:, :, ::2] = half[:, :, ::2]  # exact ties on every other column
    groups = (torch.arange(in_f) // gs)[None]
    QT, loss = fused.solve_static(W.transpose(1, 2).contiguous(), torch.eye(in_f)[None], groups,
                                  scale.transpose(1, 2), zero.transpose(1, 2).float(), 4, 128)  # fmt: skip
    S, Z = scale[0].repeat_interleave(gs, dim=1), zero[0].repeat_interleave(gs, dim=1).float()
    expect = (torch.clamp(torch.round(W[0] / S) + Z, 0, max_code(4)) - Z) * S  # torch.round: half to even
    assert torch.equal(QT[0].t(), expect)
    assert float(loss[0]) == pytest.approx(float(((W[0] - expect) ** 2).double().sum()), rel=1e-6)


def test_kernel_is_chosen_only_where_it_runs():
    assert not fused.available(torch.device("cpu"))
