"""The exported masked pool (quant.executorch): an int8 map's weighted mean summed exactly in float32, so that
the .pte and ONNX programs give the same bits for a rotated input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotconv
from quant.arithmetic import quantization_parameters
from quant.executorch import EXACT_INTEGERS, GRID_NARROWING, _ExactMaskedGlobalAvgPool, exact_pool_range


def _odd_mantissa(step: float) -> int:
    numerator = math.frexp(step)[0] * 2**53
    while numerator % 2 == 0:
        numerator //= 2
    return int(numerator)


def test_relu6_range_moves_to_step_3_128():
    # ReLU6's [0, 6] on 255 steps (6/255) moves to 255 steps of 3/128: [0, 5.977], 0.4 % narrower
    assert exact_pool_range(0.0, 6.0) == (0.0, 765 / 128)
    scale, zero_point, _, _ = quantization_parameters(0.0, 765 / 128, 8)
    assert (scale, zero_point) == (3 / 128, 0)
    # already on such a grid: unchanged; a step 20 % above the nearest such step: left alone
    assert exact_pool_range(0.0, 255 / 64) == (0.0, 255 / 64)
    assert exact_pool_range(0.0, 255 / 64 * 1.2) is None


@settings(max_examples=200, deadline=None)
@given(low=st.floats(-50, 0), high=st.floats(1e-3, 50))
def test_narrowed_range_has_a_short_step_that_dequantizes_exactly(low, high):
    grid = exact_pool_range(low, high)
    scale = quantization_parameters(low, high, 8)[0]
    if grid is None:  # no step m * 2**e (m = 1 or 3) within 1 % below the plan's step
        exponent = math.floor(math.log2(scale))
        assert max(s for s in (2.0**exponent, 1.5 * 2.0**exponent) if s <= scale) < (1 - GRID_NARROWING) * scale
        return
    step, zero_point, qmin, qmax = quantization_parameters(*grid, 8)
    assert (1 - GRID_NARROWING) * scale <= step <= scale and _odd_mantissa(step) in (1, 3)
    # zero stays on the grid and the ends are its first and last levels
    assert grid[0] == (qmin - zero_point) * step and grid[1] == (qmax - zero_point) * step
    # every level dequantizes exactly in float32, as XNNPACK's and onnxruntime's int8 -> float conversions compute
    levels = torch.arange(qmin, qmax + 1) - zero_point
    dequantized = levels.float() * torch.tensor(step, dtype=torch.float32)
    assert torch.equal(dequantized.double(), levels.double() * step)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(3, 15), channels=st.integers(1, 6), zero_point=st.integers(0, 255),
       on_grid=st.booleans(), exponent=st.integers(-12, 2), seed=st.integers(0, 2**16))
def test_pool_sums_exactly_and_gives_the_same_bits_for_a_rotated_map(size, channels, zero_point, on_grid, exponent,
                                                                     seed):
    generator = torch.Generator().manual_seed(seed)
    # a step with a 2-bit mantissa (no rounding needed), or any other step (the pool rounds to q - z first)
    step = 1.5 * 2.0**exponent if on_grid else float(torch.rand((), generator=generator) * 2.0**exponent + 1e-3)
    step = float(torch.tensor(step, dtype=torch.float32))
    pool = rotconv.MaskedGlobalAvgPool(size=size)
    exact = _ExactMaskedGlobalAvgPool(pool, step)
    assert exact.rounds == (_odd_mantissa(step) not in (1, 3))
    integers = torch.randint(0, 256, (2, channels, size, size), generator=generator) - zero_point
    x = integers.float() * torch.tensor(step, dtype=torch.float32)  # the dequantized int8 map
    y = exact(x)
    for turns in (1, 2, 3):
        assert torch.equal(exact(torch.rot90(x, turns, (-2, -1))), y), turns
    # the products and every partial sum are exact: a float32 sum in any order equals the float64 sum
    values = integers.double() if exact.rounds else integers.double() * step
    products = (values.float() * exact.integer_weights).flatten(2)
    assert torch.equal(products.double(), values.flatten(2) * exact.integer_weights.double().flatten(2))
    assert (integers.abs().double().flatten(2) * exact.integer_weights.double().flatten(2)).sum(-1).max() * (
        1 if exact.rounds else _odd_mantissa(step)) < EXACT_INTEGERS
    shuffled = products[..., torch.randperm(products.shape[-1], generator=generator)]
    assert torch.equal(shuffled.sum(-1), products.double().sum(-1).float())
    # and it is the float pool, up to the rounding of its weights to multiples of 2**-bits
    tolerance = (size * size / 2 ** (exact.bits + 1) + 1e-6) * x.abs().max().item() + 1e-30
    assert (y - pool(x)).abs().max().item() <= tolerance


def test_pool_refuses_an_unsized_pool():
    with pytest.raises(ValueError, match="size="):
        _ExactMaskedGlobalAvgPool(rotconv.MaskedGlobalAvgPool(), 0.1)
