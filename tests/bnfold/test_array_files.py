"""bnfold.array_files: each format read back exactly, by suffix or by first bytes, and each bad
file refused with a reason, an .npz's size before it is inflated."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.array_files import MAX_ARRAYS, ArrayFileError, ArrayFileTooLarge, read_arrays
from tests.array_bytes import npy_bytes, npz_bytes, safetensors_bytes, zip_bytes

X = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
Y = np.array([3, 1], np.int64)


@pytest.mark.parametrize("declared", [None, "npy"])
def test_an_npy_is_one_unnamed_array(declared):
    arrays = read_arrays(npy_bytes(X), declared)
    assert list(arrays) == [""] and arrays[""].dtype == X.dtype
    np.testing.assert_array_equal(arrays[""], X)


@pytest.mark.parametrize(
    "encode, declared",
    [
        (npz_bytes, None),
        (npz_bytes, "npz"),
        (safetensors_bytes, None),
        (safetensors_bytes, "safetensors"),
    ],
)
def test_npz_and_safetensors_keep_names_and_order(encode, declared):
    arrays = read_arrays(encode(x=X, labels=Y), declared)
    assert sorted(arrays) == ["labels", "x"]
    np.testing.assert_array_equal(arrays["x"], X)
    np.testing.assert_array_equal(arrays["labels"], Y)
    assert arrays["labels"].dtype == np.int64


@pytest.mark.parametrize(
    "data, declared, says",
    [
        (npz_bytes(x=X), "npy", "is named .npy but is a zip archive: name it .npz"),
        (
            zip_bytes(**{"readme.txt": b"hi"}),
            None,
            "the .npz entries ['readme.txt'] are not .npy arrays",
        ),
        (
            zip_bytes(**{"x.npy": b"not an array"}),
            None,
            "the .npz entries ['x'] are not .npy arrays",
        ),
        (npz_bytes(x=np.array([{"a": 1}], dtype=object)), None, "Object arrays cannot be loaded"),
        (b"PK\x03\x04 truncated", None, "not a valid .npz file"),
        (b"\x93NUMPY not really", None, "not a valid .npy file"),
        (b"x", "npz", "not a valid .npz file: File is not a zip file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", None, "not a valid .safetensors file"),
        (npy_bytes(X), "pickle", "unknown data format 'pickle'"),
    ],
)
def test_bad_files_are_refused_with_the_reason(data, declared, says):
    with pytest.raises(ArrayFileError) as caught:
        read_arrays(data, declared)
    assert says in str(caught.value)
    assert not isinstance(caught.value, ArrayFileTooLarge)


def test_an_npz_is_sized_before_it_is_inflated():
    big = np.zeros(1 << 20, np.uint8)  # deflates to about 1 kB
    data = npz_bytes(compressed=True, x=big)
    assert len(data) < 1 << 20
    with pytest.raises(ArrayFileTooLarge, match=r"inflates to \d+ bytes; the limit is 65536"):
        read_arrays(data, max_inflated_bytes=1 << 16)
    assert read_arrays(data, max_inflated_bytes=2 << 20)["x"].size == big.size


def test_an_npz_with_too_many_entries_is_refused():
    data = npz_bytes(**{f"a{i}": np.zeros(1) for i in range(MAX_ARRAYS + 1)})
    with pytest.raises(
        ArrayFileError, match=f"holds {MAX_ARRAYS + 1} arrays; at most {MAX_ARRAYS}"
    ):
        read_arrays(data)
