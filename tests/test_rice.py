"""Rice codes: exact round trips, lengths near the entropy of Laplacian data, refusals."""

import numpy as np
import pytest

from esm_index import ESMIndexError, rice


def round_trip(values, lengths, classes=None):
    stream, parameters, offsets = rice.encode(values, lengths, classes)
    decoded = rice.decode(stream, parameters, lengths, classes, offsets)
    np.testing.assert_array_equal(decoded, values)
    return stream, parameters, offsets


@pytest.mark.parametrize("values, lengths", [
    ([0], [1]),
    ([0, 0, 0, 0], [3, 1]),
    ([-1, 1, -2, 2, 7], [5]),
    ([2**24 - 1, -(2**24), 0, 5], [1, 2, 1]),  # the ends of the coder's range
    ([-3, 900, -900, 1, 0, 2], [2, 2, 2]),
])
def test_edge_cases_round_trip(values, lengths):
    round_trip(np.array(values), lengths)


def test_groups_of_different_scales_get_their_own_parameter_and_code_near_the_entropy():
    rng = np.random.default_rng(0)
    scales, lengths = [1, 3, 30, 300], [4000, 3000, 2000, 1000]
    values = np.concatenate([np.round(rng.laplace(0, s, n)) for s, n in zip(scales, lengths)]).astype(np.int64)
    stream, parameters, _ = round_trip(values, lengths)
    assert list(parameters) == sorted(parameters) and parameters[0] < parameters[-1]
    entropy = 0.0  # bits an ideal coder that knows each group's distribution (rounded Laplace) would take
    for scale, n in zip(scales, lengths):
        k = np.arange(-100 * scale, 100 * scale + 1)
        p = np.exp(-np.maximum(np.abs(k) - 0.5, 0) / scale) - np.exp(-(np.abs(k) + 0.5) / scale)
        p[k != 0] /= 2
        entropy -= n * (p * np.log2(p, where=p > 0, out=np.zeros_like(p))).sum()
    assert entropy < 8 * len(stream) < entropy + 0.1 * len(values)


def test_the_stream_format_is_fixed():
    """Indexes on disk hold these streams: bit order, group order and layout must not drift."""
    values, lengths = [0, -1, 1, 5, -7, 2, 0, 0, 3, 40], [4, 3, 2, 1]
    stream, parameters, offsets = rice.encode(values, lengths)
    assert stream.tobytes().hex() == "2fba3b210040" and parameters.tolist() == [1, 2, 1, 5] and offsets is None
    np.testing.assert_array_equal(rice.decode(np.frombuffer(bytes.fromhex("2fba3b210040"), np.uint8),
                                              np.array([1, 2, 1, 5], np.uint8), lengths), values)


def test_a_stream_with_class_offsets_has_a_fixed_format():
    """Six groups of four classes: a wide class and two narrow ones get offsets, and the stream is pinned."""
    values = [0, 1, -1, 40, 2, 0, -2, 55, 1, 1, 0, -60, 0, -1, 2, 47, 1, 0, 0, -50, 2, -1, 1, 61]
    lengths, classes = [4] * 6, np.tile(np.arange(4), 6)
    stream, parameters, offsets = rice.encode(values, lengths, classes)
    assert (stream.tobytes().hex(), parameters.tolist(), offsets.tolist()) == \
        ("6b67564bda2d6802f77bc570", [3, 4, 4, 3, 4, 4], [-3, -8, -8, 2])
    assert len(stream) + len(offsets) < len(rice.encode(values, lengths)[0])
    np.testing.assert_array_equal(rice.decode(np.frombuffer(bytes.fromhex("6b67564bda2d6802f77bc570"), np.uint8),
                                              parameters, lengths, classes, offsets), values)


def test_bad_inputs_are_refused():
    with pytest.raises(ESMIndexError, match="groups of 3 entries for 4 values"):
        rice.encode([1, 2, 3, 4], [2, 1])
    with pytest.raises(ESMIndexError, match="a group of no entries"):
        rice.encode([1, 2], [2, 0])
    with pytest.raises(ESMIndexError, match="magnitude 16777216 is out of range"):
        rice.encode([2**24], [1])
    with pytest.raises(ESMIndexError, match="dtype float64, not integers"):
        rice.encode([1.7], [1])
    with pytest.raises(ESMIndexError, match="parameters outside 0..24"):
        rice.decode(*rice.encode([1, 2], [2])[:1], np.array([25], np.uint8), [2])
    stream, parameters, _ = rice.encode(np.arange(-50, 50), [100])
    with pytest.raises(ESMIndexError, match="too short for 100 entries"):
        rice.decode(stream[: len(stream) // 2], parameters, [100])
    values, lengths, classes = np.tile([0, 1, 300], 20), [30, 30], np.tile([0, 1, 2], 20)
    stream, parameters, offsets = rice.encode(values, lengths, classes)
    for bad in (-9, -128):
        with pytest.raises(ESMIndexError, match="class offsets outside -8..8"):
            rice.decode(stream, parameters, lengths, classes, np.full(3, bad, np.int8))
    with pytest.raises(ESMIndexError, match="class offsets of dtype uint8, not signed integers"):
        rice.decode(stream, parameters, lengths, classes, offsets.view(np.uint8))
    with pytest.raises(ESMIndexError, match=r"classes of shape \(0,\) \(from 0\) for 60 values"):
        rice.decode(stream, parameters, lengths, None, offsets)
    with pytest.raises(ESMIndexError, match=r"classes of shape \(99,\) \(from 0\) for 100 values"):
        rice.encode(np.arange(-50, 50), [50, 50], np.arange(99) % 10)
    with pytest.raises(ESMIndexError, match="2 class offsets for 3 classes"):
        rice.decode(stream, parameters, lengths, classes, offsets[:-1])


def test_classes_of_another_scale_get_their_own_offset_and_never_lengthen_the_stream():
    """Rows (groups) whose entries share column scales (classes): one column 30 times wider than the rest,
    one always zero. Each gets an offset to its rows' parameters; the stream is shorter than with rows'
    parameters alone, which data without such columns keeps (no offsets: they would not pay)."""
    rng = np.random.default_rng(1)
    rows, columns = 200, 50
    scales = np.ones(columns)
    scales[3], scales[17] = 30, 0
    values = np.round(rng.laplace(0, 4 * scales, (rows, columns))).astype(np.int64).ravel()
    classes = np.tile(np.arange(columns), rows)
    lengths = [columns] * rows
    stream, _, offsets = round_trip(values, lengths, classes)
    plain, _, _ = rice.encode(values, lengths)
    assert offsets[3] >= 4 and offsets[17] < 0 and (np.abs(np.delete(offsets, [3, 17])) <= 1).all()
    assert len(stream) + len(offsets) < 0.93 * len(plain)
    values = np.round(rng.laplace(0, 4, rows * columns)).astype(np.int64)
    stream, parameters, offsets = round_trip(values, lengths, classes)
    assert offsets is None and stream.tobytes() == rice.encode(values, lengths)[0].tobytes()
