"""The GIL-free LAPACK routines of the rescoring: exact against numpy, and they let other threads run."""

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from esm_index.linalg import NotPositiveDefinite, Tridiagonal, lower_transposed_product


def spd(rng, k, n=None):
    X = rng.standard_normal((k, n or k + 5))
    return X @ X.T


@pytest.mark.parametrize("k", [1, 2, 7, 40])
def test_tridiagonal_form_keeps_spectrum_and_quadratic_forms(k):
    rng = np.random.default_rng(k)
    G = spd(rng, k)
    T = Tridiagonal.of(G)
    dense = np.diag(T.diagonal) + np.diag(T.off, 1) + np.diag(T.off, -1)
    np.testing.assert_allclose(T.eigenvalues(), np.linalg.eigvalsh(G), rtol=1e-12, atol=1e-12 * np.abs(G).max())
    C = rng.standard_normal((k, 3))
    R = T.rotate(C)  # Q^T C: the same forms with T as with G
    np.testing.assert_allclose(R.T @ dense @ R, C.T @ G @ C, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(R.T @ R, C.T @ C, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T.times(R), dense @ R, rtol=1e-12, atol=1e-12)
    shifts = np.array([1e-3, 1.0, 50.0])
    X = T.solve_shifted(shifts, R)
    for j, shift in enumerate(shifts):
        np.testing.assert_allclose((dense + shift * np.eye(k)) @ X[:, j], R[:, j], rtol=1e-9, atol=1e-9)


def test_solve_takes_any_memory_layout():
    """The m systems must lie end to end for ptsv whatever the layout of B (C order, F order, strided)."""
    rng = np.random.default_rng(3)
    T = Tridiagonal.of(spd(rng, 6))
    dense = np.diag(T.diagonal) + np.diag(T.off, 1) + np.diag(T.off, -1)
    B = rng.standard_normal((6, 6))
    for layout in (np.ascontiguousarray(B[:, :3]), np.asfortranarray(B[:, :3]), B[:, ::2]):
        X = T.solve_shifted(np.array([0.5, 1.0, 2.0]), layout)
        for j, shift in enumerate((0.5, 1.0, 2.0)):
            np.testing.assert_allclose((dense + shift * np.eye(6)) @ X[:, j], layout[:, j], rtol=1e-12, atol=1e-12)


def test_inputs_are_left_alone_and_failures_are_named():
    rng = np.random.default_rng(0)
    G = spd(rng, 6)
    before = G.copy()
    T = Tridiagonal.of(G)
    np.testing.assert_array_equal(G, before)
    with pytest.raises(NotPositiveDefinite, match="dptsv"):
        T.solve_shifted([1.0, -1e6], np.ones((6, 2)))
    with pytest.raises(ValueError, match="one shift per column"):
        T.solve_shifted([1.0], np.ones((6, 2)))
    with pytest.raises(ValueError, match=r"expected a \(6, m\) array"):
        T.solve_shifted([1.0, 1.0], np.ones((7, 2)))
    with pytest.raises(ValueError, match=r"expected a \(6, m\) array"):
        T.rotate(np.ones((9, 2)))
    assert T.solve_shifted([], np.ones((6, 0))).shape == (6, 0)
    with pytest.raises(ValueError, match="square"):
        Tridiagonal.of(np.ones((3, 4)))
    with pytest.raises(ValueError, match="triangular factor"):
        lower_transposed_product(np.eye(3), np.ones((4, 2)))


def test_lower_transposed_product():
    rng = np.random.default_rng(1)
    L, B = np.tril(rng.standard_normal((9, 9))), rng.standard_normal((9, 5)).astype(np.float32)
    np.testing.assert_allclose(lower_transposed_product(L, B), L.T @ B, rtol=1e-6)


def test_other_threads_run_while_lapack_works():
    """scipy.linalg.lapack holds the GIL through a call; these must not, or the rescoring's threads take
    turns. A second thread keeps stamping the time: some stamps must fall inside the call."""
    G = spd(np.random.default_rng(2), 900)
    stamps, done = [], threading.Event()

    def stamp():
        while not done.is_set():
            stamps.append(time.perf_counter())

    with threadpool_limits(1, user_api="blas"):
        worker = threading.Thread(target=stamp)
        worker.start()
        start = time.perf_counter()
        T = Tridiagonal.of(G)
        end = time.perf_counter()
        done.set()
        worker.join()
    assert len(T.diagonal) == 900
    middle = (start + 0.2 * (end - start), end - 0.2 * (end - start))
    assert sum(middle[0] < s < middle[1] for s in stamps) > 0
