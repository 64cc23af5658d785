import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import rotconv
from rotconv.basis import group_basis

ODD_KERNELS = st.sampled_from([1, 3, 5, 7, 9])


@given(kernel_size=ODD_KERNELS, supersample=st.sampled_from([1, 3]))
def test_quarter_turn_in_coefficient_space_is_rot90(kernel_size, supersample):
    basis = rotconv.steerable_basis(kernel_size, supersample=supersample)
    for quarter_turns in range(4):
        rotated = basis.rotated(quarter_turns * math.pi / 2)
        expected = np.rot90(basis.functions, quarter_turns, axes=(1, 2))
        # float64 sampling of cos/sin at symmetric points: equal up to a few ulps
        assert np.abs(rotated - expected).max() < 1e-12


@given(kernel_size=ODD_KERNELS, a=st.floats(-7, 7), b=st.floats(-7, 7), seed=st.integers(0, 2**16))
def test_rotation_matrices_form_a_representation(kernel_size, a, b, seed):
    basis = rotconv.steerable_basis(kernel_size)
    ra, rb, rab = basis.rotation_matrix(a), basis.rotation_matrix(b), basis.rotation_matrix(a + b)
    assert np.allclose(ra @ rb, rab, atol=1e-12)
    assert np.allclose(ra.T @ ra, np.eye(basis.size), atol=1e-12)  # orthogonal: norms are preserved
    w = np.random.default_rng(seed).standard_normal(basis.size)
    assert np.isclose(np.linalg.norm(ra @ w), np.linalg.norm(w))


@given(kernel_size=ODD_KERNELS)
def test_structure_band_limit_and_normalisation(kernel_size):
    basis = rotconv.steerable_basis(kernel_size)
    centre = (kernel_size - 1) // 2
    radii = np.asarray(basis.radii)[basis.rings]
    outer = max(basis.radii)
    for index in range(basis.size):
        m, r = basis.frequencies[index], radii[index]
        limit = 0 if r == 0 else (max(1, int(r) - 1) if r == outer else int(r))
        assert m <= limit
        if m > 0:
            assert basis.functions[index, centre, centre] == 0.0
    # cos/sin pairs share one normalisation: their squared norms average to 1
    for index in np.flatnonzero((basis.frequencies > 0) & (basis.parities == 0)):
        pair = basis.functions[index : index + 2]
        assert basis.parities[index + 1] == 1
        assert np.isclose((pair**2).sum() / 2, 1.0)
    zero = basis.frequencies == 0
    assert np.allclose((basis.functions[zero] ** 2).sum(axis=(1, 2)), 1.0)


def test_basis_is_cached_and_group_basis_uses_quarters():
    assert rotconv.steerable_basis(5) is rotconv.steerable_basis(5)
    basis = rotconv.steerable_basis(5)
    assert group_basis(basis, 12).shape == (3, basis.size, 5, 5)
    assert group_basis(basis, 6).shape == (6, basis.size, 5, 5)


def test_custom_parameters():
    basis = rotconv.steerable_basis(5, rings=[0, 1, 2], sigma=0.5, max_frequency=[0, 2, 3])
    assert basis.size == 1 + 5 + 7
    assert basis.sigmas == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=5, sigma=[0.5]), "sigma"),
    (dict(kernel_size=5, rings=[-1, 1]), "rings"),
    (dict(kernel_size=5, max_frequency=[0, 1]), "max_frequency"),
    (dict(kernel_size=5, supersample=0), "supersample"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rotconv.steerable_basis(**kwargs)
