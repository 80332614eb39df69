import pytest
import torch

from dscompress.compress.gptq.math import HessianAccumulator, gptq_quantize, inverse_hessian_factor, visiting_order
from dscompress.quant.primitives import fake_quantize, minmax_qparams, quantize_codes


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)
    x[:, :4] *= 20  # a few outlier channels, as in LLM activations
    return x


def output_error(W, Wq, X):
    return float(((X @ W.t() - X @ Wq.t()) ** 2).sum().sqrt())


def hessian(X):
    acc = HessianAccumulator(X.shape[1], torch.device("cpu"))
    for chunk in X.split(300):
        acc.add(chunk)
    return acc.H


def test_running_mean_hessian_equals_batch_formula():
    X = correlated_inputs(n=1000, d=32)
    assert torch.allclose(hessian(X), 2 * X.t() @ X / len(X), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("act_order", [False, True, "group"])
@pytest.mark.parametrize(("bits", "group_size", "sym"), [(4, 32, True), (4, 64, False), (3, -1, True), (2, 32, False)])
def test_gptq_beats_rtn_on_output_error(bits, group_size, sym, act_order):
    X = correlated_inputs()
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(W, hessian(X), bits, group_size, sym, act_order=act_order)
    rtn = fake_quantize(W, bits, group_size, sym)[0]
    assert output_error(W, res.weight, X) < 0.8 * output_error(W, rtn, X)


def test_result_lies_on_its_grid():
    X = correlated_inputs()
    W = torch.randn(32, 128)
    res = gptq_quantize(W, hessian(X), 4, 32, False)
    codes = quantize_codes(res.weight, res.scale, res.zero, 4, 32)
    rebuilt = ((codes.float().reshape(32, 4, 32) - res.zero.unsqueeze(-1)) * res.scale.unsqueeze(-1)).reshape(32, 128)
    assert torch.equal(rebuilt, res.weight)


def test_act_order_static_groups_equal_plain_g_idx():
    X = correlated_inputs()
    W = torch.randn(16, 128)
    res = gptq_quantize(W, hessian(X), 4, 32, True, act_order=True)
    assert torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    scale, zero = minmax_qparams(W, 4, 32, True)  # static: fixed from the unmodified weight, original order
    assert torch.equal(res.scale, scale) and torch.equal(res.zero, zero)


def test_dead_columns_are_zeroed():
    X = correlated_inputs()
    X[:, 7] = 0
    res = gptq_quantize(torch.randn(8, 128), hessian(X), 4, 32, True)
    assert torch.all(res.weight[:, 7] == 0)


def test_cholesky_failure_raises_damping_then_falls_back_to_rtn():
    H = hessian(correlated_inputs(n=64))  # rank 64 < 128: singular, needs damping
    factor = inverse_hessian_factor(H, damp_frac=0.0)
    assert factor is not None and factor[1] > 0.0
    W = torch.randn(8, 128)
    res = gptq_quantize(W, -torch.eye(128), 4, 32, True)  # never positive definite
    assert res.damp_used == -1.0 and torch.equal(res.weight, fake_quantize(W, 4, 32, True)[0])


def test_rows_are_independent_so_shared_input_weights_can_be_stacked():
    X = correlated_inputs()
    H = hessian(X)
    a, b = torch.randn(8, 128), torch.randn(24, 128)
    both = gptq_quantize(torch.cat([a, b]), H.clone(), 4, 32, True)  # H is consumed: give each call its own
    assert torch.allclose(both.weight[:8], gptq_quantize(a, H.clone(), 4, 32, True).weight, atol=1e-6)


def test_group_aware_order_keeps_groups_contiguous_and_takes_grids_from_compensated_weights():
    diag = torch.rand(128, generator=torch.Generator().manual_seed(3))
    perm = visiting_order(diag, 32, "group")
    assert sorted(perm.tolist()) == list(range(128))
    groups = (perm // 32).reshape(4, 32)
    assert all(len(set(row.tolist())) == 1 for row in groups)  # each group visited in one contiguous run
    assert groups[0, 0] == diag.reshape(4, 32).amax(1).argmax()  # the group holding the largest diagonal first
    X = correlated_inputs()
    W = torch.randn(16, 128)
    res = gptq_quantize(W, hessian(X), 4, 32, False, act_order="group")
    assert torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    assert not torch.equal(res.scale, minmax_qparams(W, 4, 32, False)[0])  # not static: from updated weights
    codes = quantize_codes(res.weight, res.scale, res.zero, 4, 32)
    rebuilt = ((codes.float().reshape(16, 4, 32) - res.zero.unsqueeze(-1)) * res.scale.unsqueeze(-1)).reshape(16, 128)
    assert torch.equal(rebuilt, res.weight)


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [64, -1])
def test_batched_experts_equal_one_by_one(sym, group_size, clip_search):
    """Experts solved as one batch (one kernel per column step for all of them) give what solving each alone
    gives: the same operations per matrix, bit for bit on a CPU; a dead column and a matrix that is never
    positive definite (RTN fallback) included."""
    from dscompress.compress.gptq.batched import gptq_quantize_batched

    torch.manual_seed(0)
    E, out_f, in_f = 5, 24, 256
    W = torch.randn(E, out_f, in_f) * 0.02
    X = torch.randn(E, 600, in_f) * torch.linspace(0.1, 3, in_f)
    H = 2 * X.transpose(1, 2) @ X / 600
    H[2, 5, :], H[2, :, 5] = 0, 0  # a dead column
    H[4] = -torch.eye(in_f)  # never positive definite, whatever the dampening
    args = {"act_order": True, "clip_search": clip_search}
    ref = [gptq_quantize(W[e], H[e].clone(), 4, group_size, sym, **args) for e in range(E)]
    got = gptq_quantize_batched(W.clone(), H.clone(), 4, group_size, sym, **args)
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r.weight, g.weight) and torch.equal(r.scale, g.scale) and torch.equal(r.zero, g.zero)
        assert r.damp_used == g.damp_used
    assert got[4].damp_used == -1.0


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_never_rounds_worse_than_minmax_and_clips_outlier_groups(sym):
    """searched_qparams picks, per group, the shrink whose importance-weighted rounding error is least: never
    more than min-max's, and clearly less where one outlier stretches a group's range."""
    from dscompress.quant.primitives import dequantize_codes, searched_qparams

    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 256, generator=g) * 0.02
    W[:, ::64] *= 8  # one outlier column per group of 64
    importance = torch.rand(256, generator=g) + 0.1

    def error(scale, zero):
        deq = dequantize_codes(quantize_codes(W, scale, zero, 4, 64), scale, zero, 64)
        return ((deq - W).square() * importance).reshape(32, 4, 64).sum(-1)

    searched = searched_qparams(W, 4, 64, sym, importance)
    base, found = error(*minmax_qparams(W, 4, 64, sym)), error(*searched)
    assert bool((found <= base).all())
    in_chunks = searched_qparams(W, 4, 64, sym, importance, chunk=1000)  # 3 rows at a time: the same choice
    assert torch.equal(in_chunks[0], searched[0]) and torch.equal(in_chunks[1], searched[1])
    assert float(found.sum()) < 0.97 * float(base.sum())


def test_clip_search_gptq_lies_on_its_searched_grid():
    X = correlated_inputs(d=128)
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    plain = gptq_quantize(W, hessian(X), 4, 32, False, act_order=True)
    clipped = gptq_quantize(W, hessian(X), 4, 32, False, act_order=True, clip_search=True)
    assert not torch.equal(plain.scale, clipped.scale)
    assert bool((clipped.scale <= plain.scale + 1e-8).all())  # a shrink never widens a range
    codes = quantize_codes(clipped.weight, clipped.scale, clipped.zero, 4, 32)
    from dscompress.quant.primitives import dequantize_codes

    assert torch.allclose(dequantize_codes(codes, clipped.scale, clipped.zero, 32), clipped.weight, atol=1e-6)
