"""Arrays of model inputs read from a file's bytes: calibration and recalibration data, for the
``bnfold optimize`` command and the service alike.

``.npy`` (one array, for a one-input model, named ``""``), ``.npz`` or ``.safetensors`` (one
array per name), parsed without pickles (``np.load(allow_pickle=False)``, safetensors' own
reader). The format is the one declared (a file's suffix), else told by the file's first bytes.
An ``.npz`` is a zip, whose directory is checked (entries, summed uncompressed size) before
anything is inflated. Every refusal is an ``ArrayFileError`` (a ValueError) naming the problem;
one of the size limit is an ``ArrayFileTooLarge``. A calibration file may hold, beside the
inputs, an array named ``labels``: the class indices of its samples.
"""

from __future__ import annotations

import io
import zipfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FORMATS",
    "LABELS",
    "MAX_ARRAYS",
    "ArrayFileError",
    "ArrayFileTooLarge",
    "read_arrays",
]

FORMATS = ("npy", "npz", "safetensors")
MAX_ARRAYS = 64
LABELS = "labels"  # in a calibration file, beside the inputs: its samples' class indices
_MAGIC = {b"\x93NUMPY": "npy", b"PK\x03\x04": "npz"}


class ArrayFileError(ValueError):
    """The bytes are not arrays this module reads, with the reason."""


class ArrayFileTooLarge(ArrayFileError):
    """An .npz that would inflate beyond the size limit, refused before it is inflated."""


def read_arrays(
    data: bytes, declared: str | None = None, *, max_inflated_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """{name: array} of `data`, in the file's order; `declared`: "npy", "npz", "safetensors"
    or None (told by the first bytes; neither numpy's nor zip's magic reads as safetensors)."""
    import numpy as np  # here, not at import: the command line and the service import this

    kind = declared or next((k for m, k in _MAGIC.items() if data.startswith(m)), "safetensors")
    if kind not in FORMATS:
        raise ArrayFileError(f"unknown data format {kind!r}: send .npy, .npz or .safetensors")
    try:
        if kind == "npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(array, np.ndarray):  # np.load opens a zip as an .npz
                raise ArrayFileError("the file is named .npy but is a zip archive: name it .npz")
            return {"": array}
        if kind == "npz":
            return _read_npz(data, max_inflated_bytes)
        return _read_safetensors(data)
    except ArrayFileError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArrayFileError(f"the data is not a valid .{kind} file: {exc}") from None


def _read_npz(data: bytes, max_inflated_bytes: int | None) -> dict[str, np.ndarray]:
    import numpy as np

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
    if len(entries) > MAX_ARRAYS:
        raise ArrayFileError(f"the .npz holds {len(entries)} arrays; at most {MAX_ARRAYS}")
    total = sum(e.file_size for e in entries)
    if max_inflated_bytes is not None and total > max_inflated_bytes:
        raise ArrayFileTooLarge(
            f"the .npz inflates to {total} bytes; the limit is {max_inflated_bytes}"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    # np.load hands back the raw bytes of a member that is not an .npy array
    raw = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if raw:
        raise ArrayFileError(f"the .npz entries {raw} are not .npy arrays")
    return arrays


def _read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return dict(load(data))
    except SafetensorError as exc:
        raise ValueError(str(exc)) from None
