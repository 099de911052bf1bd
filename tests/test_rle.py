"""steel.data.rle against a plain-Python reference, with hypothesis-generated masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from steel.core.names import SHAPE
from steel.data import rle

PROPS = settings(max_examples=200, deadline=None)


# ----------------------------------------------------------------------------------------------
# Reference: the definition, one pixel at a time.


def encode_ref(mask) -> str:
    h, w = len(mask), len(mask[0])
    tokens, start, n = [], None, 0
    for x in range(w):
        for y in range(h):
            n += 1  # 1-indexed, column-major
            if mask[y][x] and start is None:
                start = n
            elif not mask[y][x] and start is not None:
                tokens += [start, n - start]
                start = None
    if start is not None:
        tokens += [start, n + 1 - start]
    return " ".join(map(str, tokens))


def decode_ref(encoded: str, shape) -> list[list[int]]:
    h, w = shape
    mask = [[0] * w for _ in range(h)]
    tokens = [int(t) for t in encoded.split()]
    for start, length in zip(tokens[0::2], tokens[1::2]):
        for n in range(start, start + length):
            x, y = divmod(n - 1, h)
            mask[y][x] = 1
    return mask


# ----------------------------------------------------------------------------------------------
# Strategies: noise, rectangles (blobs) and full-length stripes, on shapes that hit every path of
# decode (multiples of 8 take the packed-bits path; others the plain transpose).

dims = st.one_of(st.integers(1, 40), st.sampled_from([8, 16, 24, 64]))
shapes = st.tuples(dims, dims)


@st.composite
def noise_masks(draw):
    return draw(arrays(np.uint8, draw(shapes), elements=st.integers(0, 1)))


@st.composite
def blob_masks(draw):
    h, w = draw(shapes)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(draw(st.integers(0, 4))):
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        mask[y0:y0 + draw(st.integers(1, h)), x0:x0 + draw(st.integers(1, w))] = 1
    for _ in range(draw(st.integers(0, 3))):  # stripes: whole rows or whole columns
        if draw(st.booleans()):
            mask[draw(st.integers(0, h - 1)), :] = 1
        else:
            mask[:, draw(st.integers(0, w - 1))] = 1
    return mask


masks = st.one_of(noise_masks(), blob_masks())


@PROPS
@given(masks)
def test_roundtrip_and_reference(mask):
    shape = mask.shape
    encoded = rle.encode(mask)
    assert encoded == encode_ref(mask.tolist())
    rle.validate(encoded, shape)
    decoded = rle.decode(encoded, shape)
    assert decoded.dtype == np.uint8 and decoded.shape == shape and decoded.flags.f_contiguous
    assert np.array_equal(decoded, mask)
    assert decoded.tolist() == decode_ref(encoded, shape)
    assert rle.area(encoded, shape) == int(mask.sum())


@PROPS
@given(masks, st.sampled_from([np.bool_, np.uint8, np.float32, np.int64]), st.integers(1, 255))
def test_encode_treats_any_nonzero_as_set(mask, dtype, value):
    assert rle.encode((mask * value).astype(dtype)) == rle.encode(mask)


@PROPS
@given(masks, st.sampled_from([" ", "  ", "\t", " \n "]), st.booleans())
def test_whitespace_is_free(mask, sep, pad):
    encoded = rle.encode(mask)
    spaced = sep.join(encoded.split())
    if pad:
        spaced = f" {spaced}\n"
    assert np.array_equal(rle.decode(spaced, mask.shape), mask)


# ----------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (8, 8), (5, 3), SHAPE])
def test_edges(shape):
    h, w = shape
    n = h * w
    empty = np.zeros(shape, np.uint8)
    assert rle.encode(empty) == ""
    for nothing in ("", "   ", None, float("nan")):
        assert np.array_equal(rle.decode(nothing, shape), empty)
        assert rle.area(nothing, shape) == 0
    full = np.ones(shape, np.uint8)
    assert rle.encode(full) == f"1 {n}"
    assert np.array_equal(rle.decode(f"1 {n}", shape), full)
    first = empty.copy()
    first[0, 0] = 1
    assert rle.encode(first) == "1 1"
    assert np.array_equal(rle.decode("1 1", shape), first)
    last = empty.copy()
    last[-1, -1] = 1
    assert rle.encode(last) == f"{n} 1"
    assert np.array_equal(rle.decode(f"{n} 1", shape), last)


def test_single_column_and_row_orders():
    col = np.array([[1], [1], [0], [1]], np.uint8)
    assert rle.encode(col) == "1 2 4 1"
    row = np.array([[1, 1, 0, 1]], np.uint8)
    assert rle.encode(row) == "1 2 4 1"  # one row: column-major numbering is left to right
    m = np.array([[1, 0], [1, 1]], np.uint8)  # column-major: 1,2 then 3 is (0,1)=0, 4 is (1,1)=1
    assert rle.encode(m) == "1 2 4 1"
    wrap = np.zeros((3, 4), np.uint8)  # a run down the bottom of column 0 into the top of column 1
    wrap[2, 0] = wrap[0, 1] = wrap[1, 1] = 1
    assert rle.encode(wrap) == "3 3"
    assert np.array_equal(rle.decode("3 3", (3, 4)), wrap)


def test_touching_runs_are_accepted():
    assert np.array_equal(rle.decode("1 2 3 2", (2, 3)), rle.decode("1 4", (2, 3)))


def test_full_size_dense_and_sparse():
    rng = np.random.default_rng(0)
    dense = np.zeros(SHAPE, np.uint8)
    dense[40:200, 301:777] = 1  # a blob: the packed-bits path, columns not aligned to 8
    sparse = (rng.random(SHAPE) < 0.002).astype(np.uint8)  # pits: the scatter path
    sparse[-1, 10] = sparse[0, 11] = 1  # a run wrapping into the next column
    for mask in (dense, sparse, dense | sparse):
        encoded = rle.encode(mask)
        assert np.array_equal(rle.decode(encoded), mask)
        assert encoded == encode_ref(mask.tolist())


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("encoded, reason", [
    ("1 2 3", "odd number of tokens"),
    ("1 2.5", "'2.5' is not an integer"),
    ("1 a", "'a' is not an integer"),
    ("0 3", "start 0 is not positive"),
    ("-4 3", "start -4 is not positive"),
    ("5 0", "run length 0 is not positive"),
    ("5 -1", "run length -1 is not positive"),
    ("10 2 5 1", "not sorted: start 5 follows 10"),
    ("10 2 10 1", "not sorted"),
    ("1 5 3 2", "overlap: run at 1 .length 5. covers start 3"),
    ("20 1", "ends at pixel 20, past the image's 12 pixels"),
    ("10 4", "ends at pixel 13"),
    ("1 99999999999999999999999", "'99999999999999999999999' is too large"),
    ("9223372036854775806 9223372036854775806", "past the image"),
    ("2 9223372036854775807", "past the image"),
    ("1 2 9223372036854775807 9223372036854775807", "past the image"),
])
def test_validate_errors(encoded, reason):
    with pytest.raises(rle.RLEError, match=reason):
        rle.validate(encoded, (3, 4))
    with pytest.raises(ValueError, match=reason):  # RLEError is a ValueError
        rle.decode(encoded, (3, 4))
    with pytest.raises(rle.RLEError):
        rle.area(encoded, (3, 4))


def test_validate_accepts_the_last_pixel_and_rejects_other_types():
    rle.validate("12 1", (3, 4))
    rle.validate("1 12", (3, 4))
    with pytest.raises(rle.RLEError, match="must be a string, got int"):
        rle.validate(17, (3, 4))
    with pytest.raises(rle.RLEError, match="2-D"):
        rle.encode(np.zeros((2, 2, 3)))


@PROPS
@given(masks, st.data())
def test_area_matches_mask(mask, data):
    encoded = rle.encode(mask)
    assert rle.area(encoded, mask.shape) == int(mask.sum())
