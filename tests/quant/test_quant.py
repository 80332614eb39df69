import pytest
import torch

from dscompress.quant.primitives import (
    dequantize_codes,
    fake_quantize,
    max_code,
    minmax_qparams,
    quantize_codes,
    sqnr_db,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_round_trip_exactly(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    deq, scale, zero = fake_quantize(w, bits, group_size, symmetric)
    q = quantize_codes(deq, scale, zero, bits, group_size)
    assert int(q.max()) <= max_code(bits)
    assert torch.equal(dequantize_codes(q, scale, zero, group_size), deq)  # re-deriving codes is exact


def test_symmetric_zero_point_is_mid_grid():
    _, zero = minmax_qparams(torch.randn(4, 64), bits=4, group_size=32, symmetric=True)
    assert zero.unique().tolist() == [8]


def test_asymmetric_keeps_zero_exact():
    w = torch.rand(8, 64) + 0.5  # all positive: the range is [0, max]
    deq, _, _ = fake_quantize(w, 4, 32, symmetric=False)
    w[0, 0] = 0.0
    deq0, _, _ = fake_quantize(w, 4, 32, symmetric=False)
    assert deq0[0, 0] == 0.0
    assert deq.shape == w.shape


@pytest.mark.parametrize(("bits", "group_size", "floor_db"), [(8, -1, 38.0), (4, 32, 17.0), (4, 128, 15.0)])
def test_sqnr(bits, group_size, floor_db):
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    deq, _, _ = fake_quantize(w, bits, group_size, symmetric=True)
    assert sqnr_db(w, deq) > floor_db


def test_smaller_groups_are_more_accurate():
    torch.manual_seed(2)
    w = torch.randn(128, 256) * torch.linspace(0.1, 3, 256)
    errs = [sqnr_db(w, fake_quantize(w, 4, g, False)[0]) for g in (128, 64, 32)]
    assert errs[0] < errs[1] < errs[2]


def test_stacked_experts_are_quantized_per_expert_row():
    torch.manual_seed(3)
    w = torch.randn(4, 16, 64)
    w[2] *= 100  # one loud expert must not coarsen the others' grids
    deq, scale, zero = fake_quantize(w, 4, 32, True)
    assert scale.shape == (4, 16, 2) and zero.shape == (4, 16, 2)
    flat, _, _ = fake_quantize(w[0], 4, 32, True)
    assert torch.equal(deq[0], flat)


def test_all_zero_group_stays_zero():
    w = torch.zeros(2, 32)
    deq, scale, _ = fake_quantize(w, 4, 32, False)
    assert torch.equal(deq, w) and torch.all(scale == 1)
