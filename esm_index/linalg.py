"""The LAPACK and BLAS routines of ESM-LogME's rescoring, called without holding the GIL.

scipy.linalg.lapack's wrappers hold the GIL for the whole call, so the threads of `logme_from_stats` took
turns at the tridiagonalisation (2 threads ran it 1.08x as fast as one; numpy.linalg releases the GIL, which
is why its eigh scaled). ctypes releases it. The routines are the ones scipy links, taken from the function
pointers that scipy.linalg.cython_lapack and cython_blas export for Cython (numba takes them the same way).
Arrays are float64 and Fortran-ordered; no routine modifies its inputs (those LAPACK overwrites are copied).
ctypes gets only an array's address, so each array lives in a name until the call returns.
"""

import ctypes
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cython_blas, cython_lapack

BLOCK = 64  # workspace per column: LAPACK's block sizes are 32-64, so the routines run blocked

_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


class NotPositiveDefinite(np.linalg.LinAlgError):
    """A matrix that had to be positive definite was not (to working precision)."""


def _routine(module, name: str, arguments: int):
    """The Fortran routine `name` (every argument by reference) as a ctypes function."""
    capsule = module.__pyx_capi__[name]
    routine = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * arguments)(_capsule_pointer(capsule, _capsule_name(capsule)))
    routine.__name__ = name
    return routine


_dtrmm = _routine(cython_blas, "dtrmm", 11)
_dsytrd = _routine(cython_lapack, "dsytrd", 10)
_dormtr = _routine(cython_lapack, "dormtr", 13)
_dsterf = _routine(cython_lapack, "dsterf", 4)
_dptsv = _routine(cython_lapack, "dptsv", 7)


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def _float(value: float):
    return ctypes.byref(ctypes.c_double(value))


def _char(value: str):
    return ctypes.c_char_p(value.encode())


def _fortran(array) -> np.ndarray:
    """A float64 Fortran-ordered copy, which the routine may overwrite."""
    return np.array(array, dtype=np.float64, order="F")


def _call(routine, *arguments, failure=np.linalg.LinAlgError) -> None:
    """routine(*arguments, info); a negative info is a bug here, a positive one the routine's failure."""
    info = ctypes.c_int(0)
    routine(*arguments, ctypes.byref(info))
    if info.value < 0:
        raise ValueError(f"{routine.__name__}: argument {-info.value} is invalid")
    if info.value > 0:
        raise failure(f"{routine.__name__} failed (info {info.value})")


def lower_transposed_product(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """L^T B for lower-triangular L (k, k) and B (k, m): half the flops of a general product."""
    k, m = B.shape
    if L.shape != (k, k):
        raise ValueError(f"a ({k}, {k}) triangular factor is needed for B of shape {B.shape}, got {L.shape}")
    L, out = np.asfortranarray(L, dtype=np.float64), _fortran(B)  # dtrmm reads L and overwrites out
    _dtrmm(_char("L"), _char("L"), _char("T"), _char("N"), _int(k), _int(m), _float(1.0),
           L.ctypes.data, _int(max(k, 1)), out.ctypes.data, _int(max(k, 1)))
    return out


@dataclass(frozen=True)
class Tridiagonal:
    """M = Q T Q^T for a symmetric M: T tridiagonal (its diagonal and off-diagonal), Q as LAPACK's
    Householder reflectors (sytrd), applied by `rotate`."""

    diagonal: np.ndarray  # (k,)
    off: np.ndarray       # (k - 1,)
    reflectors: np.ndarray
    tau: np.ndarray

    @classmethod
    def of(cls, M: np.ndarray) -> "Tridiagonal":
        """Tridiagonalise M (its lower triangle is read)."""
        k = len(M)
        if M.shape != (k, k) or k == 0:
            raise ValueError(f"a non-empty square matrix is needed, got shape {M.shape}")
        reflectors, diagonal, off, tau = _fortran(M), np.empty(k), np.empty(k - 1), np.empty(k - 1)
        work = np.empty(BLOCK * k)  # a name: the routine gets only its address
        _call(_dsytrd, _char("L"), _int(k), reflectors.ctypes.data, _int(k), diagonal.ctypes.data,
              off.ctypes.data, tau.ctypes.data, work.ctypes.data, _int(len(work)))
        return cls(diagonal, off, reflectors, tau)

    def rotate(self, C: np.ndarray) -> np.ndarray:
        """Q^T C for C (k, m): the columns in T's basis."""
        k, m = self._columns(C)
        out, work = _fortran(C), np.empty(BLOCK * max(m, 1))
        _call(_dormtr, _char("L"), _char("L"), _char("T"), _int(k), _int(m), self.reflectors.ctypes.data,
              _int(k), self.tau.ctypes.data, out.ctypes.data, _int(k), work.ctypes.data, _int(len(work)))
        return out

    def _columns(self, C: np.ndarray) -> tuple[int, int]:
        """(k, m) of C, which must have T's k rows: LAPACK would read past the factors otherwise."""
        if C.ndim != 2 or len(C) != len(self.diagonal):
            raise ValueError(f"expected a ({len(self.diagonal)}, m) array, got shape {C.shape}")
        return C.shape

    def eigenvalues(self) -> np.ndarray:
        """T's (and M's) eigenvalues, ascending, without eigenvectors (root-free QR, sterf)."""
        values, off = self.diagonal.copy(), self.off.copy()
        _call(_dsterf, _int(len(values)), values.ctypes.data, off.ctypes.data)
        return values

    def times(self, x: np.ndarray) -> np.ndarray:
        """T x for x (k,) or (k, m)."""
        diagonal, off = (self.diagonal, self.off) if x.ndim == 1 else (self.diagonal[:, None], self.off[:, None])
        out = diagonal * x
        out[:-1] += off * x[1:]
        out[1:] += off * x[:-1]
        return out

    def solve_shifted(self, shifts: np.ndarray, B: np.ndarray) -> np.ndarray:
        """X with (T + shifts[j] I) X[:, j] = B[:, j] for B (k, m): one O(m k) LDL^T solve (ptsv) of the
        block-diagonal system the m shifted copies of T form. Raises NotPositiveDefinite when one of them is
        not positive definite."""
        k, m = self._columns(B)
        shifts = np.asarray(shifts, dtype=np.float64)
        if shifts.shape != (m,):
            raise ValueError(f"one shift per column is needed: {m} columns, shifts of shape {shifts.shape}")
        if m == 0:
            return np.zeros((k, 0))
        diagonal = (self.diagonal + shifts[:, None]).ravel()
        off = np.zeros((m, k))
        off[:, :-1] = self.off
        off = off.ravel()[:-1]  # zero between the blocks
        X = np.array(B.T, dtype=np.float64, order="C")  # (m, k) copy: the blocks' right-hand sides end to end
        _call(_dptsv, _int(m * k), _int(1), diagonal.ctypes.data, off.ctypes.data, X.ctypes.data,
              _int(m * k), failure=NotPositiveDefinite)
        return X.T
