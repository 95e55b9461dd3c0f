"""Rice codes for integer arrays, in numpy without a Python loop over entries.

Rounded ESM entries are near Laplacian, and a Rice code (a zigzagged value u as u >> k in unary, then its
low k bits) comes within 0.03-0.07 bits per entry of the entropy of such data at the spreads of ESM rows
(k = 2 to 9; 0.1 or more below); lzma, a byte-oriented coder, spends 1.3 bits more per entry on 10-bit
codes (BENCHMARKS.md, "Compact storage").
The entries come in groups (an ESM's rows), each with its own parameter k, chosen to minimise its length.
The stream keeps all unary parts first, then the low bits, those of the entries with the smallest k first,
so that both decode in whole-array steps: the unary parts end at their n-th zero bit, and the low bits of
the entries that share a k form one (entries, k) bit matrix.
"""

import numpy as np

from .errors import ESMIndexError

MAX_PARAMETER = 24  # k per group: values in [-2^24, 2^24) take at most a few unary bits


def encode(values, lengths):
    """(stream, parameters): `values` (integers, consecutive groups of `lengths` entries) as one uint8
    stream, and each group's parameter k as uint8."""
    if np.asarray(values).dtype.kind not in "iub":
        raise ESMIndexError(f"Rice code: values of dtype {np.asarray(values).dtype}, not integers")
    values, lengths = np.asarray(values, np.int64), np.asarray(lengths, np.int64)
    if (lengths <= 0).any():
        raise ESMIndexError("Rice code: a group of no entries")
    if lengths.sum() != len(values):
        raise ESMIndexError(f"Rice code: groups of {lengths.sum()} entries for {len(values)} values")
    u = np.where(values >= 0, 2 * values, -2 * values - 1)  # zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
    if u.max(initial=0) >= 2 ** (MAX_PARAMETER + 1):
        raise ESMIndexError(f"Rice code: a value of magnitude {np.abs(values).max()} is out of range")
    starts = np.cumsum(lengths) - lengths
    shifts = np.arange(MAX_PARAMETER + 1)
    sizes = np.stack([np.add.reduceat(u >> k, starts) for k in shifts], 1) + lengths[:, None] * (shifts + 1)
    parameters = sizes.argmin(1)
    k = np.repeat(parameters, lengths)
    high = u >> k
    unary = np.ones(high.sum() + len(u), np.uint8)
    unary[np.cumsum(high + 1) - 1] = 0
    low = [(u[k == width, None] >> np.arange(width) & 1).ravel() for width in np.unique(parameters)]
    return np.packbits(np.concatenate([unary, *low]).astype(np.uint8)), parameters.astype(np.uint8)


def decode(stream, parameters, lengths):
    """The integers `encode` coded into `stream`, given its groups' parameters and lengths."""
    parameters, lengths = np.asarray(parameters), np.asarray(lengths, np.int64)
    if parameters.dtype.kind not in "iu" or ((parameters < 0) | (parameters > MAX_PARAMETER)).any():
        raise ESMIndexError(f"Rice code: parameters outside 0..{MAX_PARAMETER}")
    parameters = parameters.astype(np.int64)
    k = np.repeat(parameters, lengths)
    bits = np.unpackbits(np.asarray(stream, np.uint8))
    ends = np.flatnonzero(bits[: max(len(bits) - k.sum(), 0)] == 0)[: len(k)]  # no unary end among the low bits
    low_start = ends[-1] + 1 if len(ends) else 0
    if len(ends) < len(k) or low_start + k.sum() > len(bits):
        raise ESMIndexError(f"Rice code: the stream of {len(bits)} bits is too short for {len(k)} entries")
    u = (np.diff(ends, prepend=-1) - 1) << k
    for width in np.unique(parameters):
        entries = np.flatnonzero(k == width)
        block = bits[low_start : low_start + len(entries) * width].reshape(len(entries), width)
        low_start += block.size
        u[entries] += sum(block[:, bit].astype(np.int64) << bit for bit in range(width))
    return (u >> 1) ^ -(u & 1)  # zigzag undone
