"""Rice codes for integer arrays, in numpy without a Python loop over entries.

Rounded ESM entries are near Laplacian, and a Rice code (a zigzagged value u as u >> k in unary, then its
low k bits) comes within 0.03-0.07 bits per entry of the entropy of such data at the spreads of ESM rows
(k = 2 to 9; 0.1 or more below); lzma, a byte-oriented coder, spends 1.3 bits more per entry on 10-bit
codes (BENCHMARKS.md, "Compact storage").
The entries come in groups (an ESM's rows), each with its own parameter k, chosen to minimise its length.
Entries may also belong to classes (an ESM's columns: an input dimension the map weighs more needs larger
entries in every row), each with an offset added to the k of its entries, chosen with the groups'
parameters by alternating exact minimisation (each step never lengthens the stream) and kept only where
they save more than their own bytes.
The stream keeps all unary parts first, then the low bits, those of the entries with the smallest k first,
so that both decode in whole-array steps: the unary parts end at their n-th zero bit, and the low bits of
the entries that share a k form one (entries, k) bit matrix.
"""

import numpy as np

from .errors import ESMIndexError

MAX_PARAMETER = 24  # k per entry: values in [-2^24, 2^24) take at most a few unary bits
MAX_OFFSET = 8  # a class's offset to its entries' k
ROUNDS = 2  # of choosing the classes' offsets, then the groups' parameters again


def encode(values, lengths, classes=None):
    """(stream, parameters, offsets): `values` (integers, consecutive groups of `lengths` entries) as one
    uint8 stream, each group's parameter k as uint8, and, given each entry's class (integers from 0), each
    class's offset to k as int8: None without classes, or where the offsets would not pay for their bytes."""
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
    shift = np.zeros(len(u), np.int64)  # each entry's class offset
    parameters, size = _best_parameters(u, starts, shift)
    offsets = None
    if classes is not None:
        classes = _checked_classes(classes, len(u))
        chosen = parameters
        for _ in range(ROUNDS):
            offsets = _best_offsets(u, np.repeat(chosen, lengths), classes)
            shifted = offsets[classes]
            chosen, shifted_size = _best_parameters(u, starts, shifted)
        if shifted_size + 8 * len(offsets) < size:  # the offsets pay for their own bytes
            parameters, shift, offsets = chosen, shifted, offsets.astype(np.int8)
        else:
            offsets = None
    k = _entry_parameters(parameters, lengths, shift)
    high = u >> k
    unary = np.ones(high.sum() + len(u), np.uint8)
    unary[np.cumsum(high + 1) - 1] = 0
    low = [(u[k == width, None] >> np.arange(width) & 1).ravel() for width in _widths(k)]
    return np.packbits(np.concatenate([unary, *low]).astype(np.uint8)), parameters.astype(np.uint8), offsets


def decode(stream, parameters, lengths, classes=None, offsets=None):
    """The integers `encode` coded into `stream`, given its groups' parameters and lengths, and, if it was
    coded with classes, each entry's class and the classes' offsets."""
    parameters, lengths = np.asarray(parameters), np.asarray(lengths, np.int64)
    if parameters.dtype.kind not in "iu" or ((parameters < 0) | (parameters > MAX_PARAMETER)).any():
        raise ESMIndexError(f"Rice code: parameters outside 0..{MAX_PARAMETER}")
    shift = 0
    if offsets is not None:
        offsets = np.asarray(offsets)
        if offsets.dtype.kind != "i":
            raise ESMIndexError(f"Rice code: class offsets of dtype {offsets.dtype}, not signed integers")
        if ((offsets < -MAX_OFFSET) | (offsets > MAX_OFFSET)).any():
            raise ESMIndexError(f"Rice code: class offsets outside -{MAX_OFFSET}..{MAX_OFFSET}")
        classes = _checked_classes(classes, lengths.sum())
        if classes.max(initial=-1) >= len(offsets):
            raise ESMIndexError(f"Rice code: {len(offsets)} class offsets for {classes.max() + 1} classes")
        shift = offsets.astype(np.int64)[classes]
    k = _entry_parameters(parameters.astype(np.int64), lengths, shift)
    bits = np.unpackbits(np.asarray(stream, np.uint8))
    ends = np.flatnonzero(bits[: max(len(bits) - k.sum(), 0)] == 0)[: len(k)]  # no unary end among the low bits
    low_start = ends[-1] + 1 if len(ends) else 0
    if len(ends) < len(k) or low_start + k.sum() > len(bits):
        raise ESMIndexError(f"Rice code: the stream of {len(bits)} bits is too short for {len(k)} entries")
    u = (np.diff(ends, prepend=-1) - 1) << k
    for width in _widths(k):
        entries = np.flatnonzero(k == width)
        block = bits[low_start : low_start + len(entries) * width].reshape(len(entries), width)
        low_start += block.size
        u[entries] += sum(block[:, bit].astype(np.int64) << bit for bit in range(width))
    return (u >> 1) ^ -(u & 1)  # zigzag undone


def _checked_classes(classes, count):
    classes = np.asarray(classes if classes is not None else [], np.int64)
    if classes.shape != (count,) or (classes < 0).any():
        raise ESMIndexError(f"Rice code: classes of shape {classes.shape} (from 0) for {count} values")
    return classes


def _entry_parameters(parameters, lengths, shift):
    return _coded_parameter(np.repeat(parameters, lengths) + shift)


def _coded_parameter(k):
    return np.clip(k, 0, MAX_PARAMETER)


def _widths(k):
    """The distinct parameters among the entries, smallest first (a count, not a sort: k is small)."""
    return np.flatnonzero(np.bincount(k, minlength=MAX_PARAMETER + 1))


def _coded_bits(u, k):
    """Bits of each entry's Rice code with parameter k: its unary part, its end, its low bits."""
    return (u >> k) + 1 + k


def _best_parameters(u, starts, shift):
    """(parameters, bits): the groups' parameters of the shortest stream, each entry's k its group's
    parameter + `shift`, and that stream's length in bits. A parameter that leaves every entry's k at or
    above the bit length of the largest u codes every unary part as one bit, and a larger one only adds
    low bits: no candidate beyond it can be shorter."""
    enough = int(u.max(initial=0)).bit_length() - int(shift.min(initial=0))
    candidates = np.arange(min(MAX_PARAMETER, max(enough, 0)) + 1)
    sizes = np.stack([np.add.reduceat(_coded_bits(u, _coded_parameter(k + shift)), starts) for k in candidates], 1)
    return sizes.argmin(1), int(sizes.min(1).sum())


def _best_offsets(u, entry_parameters, classes):
    """The classes' offsets of the shortest stream, given each entry's group parameter."""
    candidates = np.arange(-MAX_OFFSET, MAX_OFFSET + 1)
    sizes = np.stack([np.bincount(classes, _coded_bits(u, _coded_parameter(entry_parameters + offset)))
                      for offset in candidates], 1)
    sizes[:, MAX_OFFSET] -= 0.5  # ties keep offset 0
    return candidates[sizes.argmin(1)]
