"""Rice codes: exact round trips, lengths near the entropy of Laplacian data, refusals."""

import numpy as np
import pytest

from esm_index import ESMIndexError, rice


def round_trip(values, lengths):
    stream, parameters = rice.encode(values, lengths)
    decoded = rice.decode(stream, parameters, lengths)
    np.testing.assert_array_equal(decoded, values)
    return stream, parameters


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
    stream, parameters = round_trip(values, lengths)
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
    stream, parameters = rice.encode(values, lengths)
    assert stream.tobytes().hex() == "2fba3b210040" and parameters.tolist() == [1, 2, 1, 5]
    np.testing.assert_array_equal(rice.decode(np.frombuffer(bytes.fromhex("2fba3b210040"), np.uint8),
                                              np.array([1, 2, 1, 5], np.uint8), lengths), values)


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
    stream, parameters = rice.encode(np.arange(-50, 50), [100])
    with pytest.raises(ESMIndexError, match="too short for 100 entries"):
        rice.decode(stream[: len(stream) // 2], parameters, [100])
