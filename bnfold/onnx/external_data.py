"""The external-data guard: a model may name files to read its tensors from; read only what
lives inside a directory the caller chose.

Rules, in order:

1. No tensor stored externally: nothing to read, no directory needed.
2. External tensors and no ``base_dir``: refuse; the model alone does not say where it is
   allowed to read from.
3. Each location must be relative, without ``..``, and resolve (symlinks followed) to a file
   inside ``base_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx.external_data_helper import (
    _get_all_tensors,
    load_external_data_for_model,
    uses_external_data,
)

__all__ = ["ExternalDataError", "external_locations", "load_external_data"]


class ExternalDataError(ValueError):
    """The model's external data cannot be read safely."""


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The external-data file locations the model refers to (case 1 when empty).

    Walks the same tensors that onnx's loader reads (initializers and attribute tensors, in
    subgraphs too), so every file the loader could open is checked first."""
    return [
        {e.key: e.value for e in tensor.external_data}.get("location", "")
        for tensor in _get_all_tensors(model)
        if uses_external_data(tensor)
    ]


def _check_location(location: str, base: Path) -> None:
    """Rule 3."""
    if not location:
        raise ExternalDataError("an external tensor has no location")
    if (
        os.path.isabs(location)
        or PurePosixPath(location).is_absolute()
        or PureWindowsPath(location).is_absolute()
        or PureWindowsPath(location).drive
    ):
        raise ExternalDataError(f"external data location {location!r} is absolute")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if ".." in parts:
        raise ExternalDataError(f"external data location {location!r} contains '..'")
    resolved = (base / location).resolve()
    if not resolved.is_relative_to(base):
        raise ExternalDataError(f"external data location {location!r} resolves outside {base}")
    if not resolved.is_file():
        raise ExternalDataError(f"external data file {location!r} not found in {base}")


def load_external_data(
    model: onnx.ModelProto, base_dir: str | os.PathLike | None
) -> onnx.ModelProto:
    """Return `model` with every external tensor read into memory (a copy when there are
    any), or raise ExternalDataError."""
    locations = external_locations(model)
    if not locations:  # rule 1
        return model
    if base_dir is None:  # rule 2
        raise ExternalDataError(
            f"model keeps {len(locations)} tensor(s) in external data files "
            f"(e.g. {locations[0]!r}); pass base_dir= the directory that holds them"
        )
    base = Path(base_dir).resolve()
    if not base.is_dir():
        raise ExternalDataError(f"base_dir {str(base_dir)!r} is not a directory")
    for location in sorted(set(locations)):
        _check_location(location, base)
    loaded = onnx.ModelProto()
    loaded.CopyFrom(model)
    load_external_data_for_model(loaded, str(base))
    return loaded
