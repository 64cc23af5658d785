import math

import pytest
import torch
from hypothesis import given, strategies as st

import rotconv
from conftest import smooth_masked_input


@given(N=st.integers(1, 16), fields=st.integers(1, 3), k=st.integers(-20, 20), size=st.integers(1, 9))
def test_rotate_exact_elements_are_rot90_and_shift(N, fields, k, size):
    group = rotconv.CyclicGroup(N)
    x = torch.randn(2, fields * N, size, size)
    if not group.is_exact(k):
        return
    quarter_turns = (4 * (k % N)) // N
    expected = torch.rot90(x, quarter_turns, dims=(-2, -1)).reshape(2, fields, N, size, size)
    expected = torch.roll(expected, k % N, dims=2).reshape(x.shape)
    assert torch.equal(group.rotate(x, k), expected)
    assert torch.equal(group.rotate(x, k, regular=False), torch.rot90(x, quarter_turns, dims=(-2, -1)))


@given(N=st.integers(1, 16), a=st.integers(0, 15), b=st.integers(0, 15))
def test_regular_representation_is_a_homomorphism(N, a, b):
    group = rotconv.CyclicGroup(N)
    product = group.regular_representation(a) @ group.regular_representation(b)
    assert torch.equal(product, group.regular_representation(a + b))
    v = torch.arange(N, dtype=torch.float32)
    # (P v)[i] = v[i - k]: the same cyclic shift that rotate() applies to a field's channels
    assert torch.equal(group.regular_representation(a) @ v, torch.roll(v, a % N))


def test_interpolated_rotation_matches_rot90_direction_on_smooth_input():
    # An angle a hair off 90 degrees takes the bicubic path; on a smooth input it must agree with rot90
    # (counter-clockwise as displayed) up to interpolation error, and disagree with the clockwise turn.
    x = smooth_masked_input(1, 1, 33, sigma=2.0, seed=0)
    rotated = rotconv.rotate_image(x, math.pi / 2 + 1e-7)
    ccw = torch.rot90(x, 1, dims=(-2, -1))
    cw = torch.rot90(x, -1, dims=(-2, -1))
    assert (rotated - ccw).norm() / ccw.norm() < 1e-4
    assert (rotated - cw).norm() / cw.norm() > 0.5


def test_interpolated_rotation_composes_on_smooth_input():
    # Two 15-degree bicubic rotations ~ one 30-degree rotation. Bicubic (Keys) interpolation of a field
    # smoothed with sigma=3 px blurs by about 1% per step (measured: 2.0% between the two paths); we allow
    # 3% inside a disc 4 px (two cubic supports) away from the input's masked edge, which is not smooth.
    # A wrong direction or centre would give errors of order 100%.
    x = smooth_masked_input(1, 1, 41, sigma=3.0, seed=1)
    twice = rotconv.rotate_image(rotconv.rotate_image(x, math.pi / 12), math.pi / 12)
    once = rotconv.rotate_image(x, math.pi / 6)
    mask = rotconv.disc_mask(41, 41, 16.0, edge_width=0, dtype=x.dtype)
    assert ((twice - once) * mask).norm() / (once * mask).norm() < 0.03


@pytest.mark.parametrize("N", [0, -1, 2.5, True, "4"])
def test_bad_group_order(N):
    with pytest.raises(ValueError, match="N"):
        rotconv.CyclicGroup(N)


def test_rotate_rejects_non_field_channels():
    with pytest.raises(ValueError, match="multiple of the group order 4"):
        rotconv.CyclicGroup(4).rotate(torch.randn(1, 6, 5, 5), 1)
