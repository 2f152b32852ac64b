"""The bytes of array files, made in memory for the tests that feed bnfold good and bad
calibration, label and example files: .npz, .npy, a bare zip and .safetensors."""

from __future__ import annotations

import io
import zipfile

import numpy as np


def npz_bytes(compressed: bool = False, **arrays) -> bytes:
    out = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(out, **arrays)
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def zip_bytes(**members: bytes) -> bytes:
    """A zip archive with these members, whatever they hold (an .npz that is not one)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def safetensors_bytes(**arrays) -> bytes:
    from safetensors.numpy import save

    return save(arrays)
