"""The on-disk model repository.

Layout under the store root::

    models/<name>/CURRENT             the deployed version, one line; replaced atomically
    models/<name>/<version>/model.onnx  the folded graph
    models/<name>/<version>/record.json what the service says about it (reports, signature)
    models/<name>/<version>/original.onnx the unfolded graph it was folded from, where kept: the
                                      drift monitor's observer and recalibration start from it
    models/<name>/PREVIOUS            the version current before the last deploy or rollback,
                                      kept by prune so that a rollback has somewhere to go
    tmp/                              scratch: uploads, worker jobs, staged versions, trash
    api_token                         the generated management token (mode 0600)

A version becomes visible only through ``os.replace`` of ``CURRENT`` after its directory is
complete and renamed into place, so a ``kill -9`` at any moment leaves either the previous
deployment or the new one, never a half-written model. ``recover()`` at start removes whatever
such a kill left behind: scratch, versions that never became current, names without one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import BadRequest, NotFound

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
RECORD_FILE = "record.json"
CURRENT_FILE = "CURRENT"
ORIGINAL_FILE = "original.onnx"
PREVIOUS_FILE = "PREVIOUS"

# letters, digits, '.', '_', '-'; must start with a letter or digit. This alone excludes path
# separators, NUL and control characters; '..' is refused on top so no name reads like a path.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"[0-9a-f]{1,64}")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise BadRequest(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


@dataclass(frozen=True)
class StoredModel:
    name: str
    version: str
    model_path: Path
    record: dict[str, Any]

    @property
    def original_path(self) -> Path:
        """The unfolded graph (absent for versions deployed before it was kept)."""
        return self.model_path.with_name(ORIGINAL_FILE)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"

    def open(self) -> None:
        """Create the layout if needed (mode 0700: the store holds the token)."""
        for d in (self.root, self.models_dir, self.tmp_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- paths -------------------------------------------------------------------------------
    def _name_dir(self, name: str) -> Path:
        path = self.models_dir / validate_name(name)
        # the regex already guarantees it; this is the invariant the rest of the code relies on
        if path.parent != self.models_dir:
            raise BadRequest(f"invalid model name {name!r}")
        return path

    def scratch_dir(self, prefix: str) -> Path:
        """A fresh private directory under tmp/, on the same filesystem as models/."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))

    # -- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if _NAME_RE.fullmatch(p.name))

    def current_version(self, name: str) -> str | None:
        return self._read_version(name, CURRENT_FILE)

    def previous_version(self, name: str) -> str | None:
        return self._read_version(name, PREVIOUS_FILE)

    def _read_version(self, name: str, pointer: str) -> str | None:
        try:
            version = (self._name_dir(name) / pointer).read_text().strip()
        except FileNotFoundError:
            return None
        return version if _VERSION_RE.fullmatch(version) else None

    def original_path(self, name: str, version: str) -> Path:
        if not _VERSION_RE.fullmatch(version):
            raise ValueError(f"bad version {version!r}")
        return self._name_dir(name) / version / ORIGINAL_FILE

    def get(self, name: str) -> StoredModel:
        version = self.current_version(name)
        if version is None:
            raise NotFound(f"model {name!r} is not deployed")
        vdir = self._name_dir(name) / version
        record = json.loads((vdir / RECORD_FILE).read_text())
        return StoredModel(name, version, vdir / MODEL_FILE, record)

    # -- writing -----------------------------------------------------------------------------
    def deploy(
        self,
        name: str,
        version: str,
        model_file: Path,
        record: dict[str, Any],
        original_file: Path | None = None,
    ) -> Path:
        """Put a complete version directory in place and make it current, atomically.

        ``model_file`` (and ``original_file``, the unfolded graph) are moved (they must live
        under tmp/). The version current until now becomes ``PREVIOUS``. Returns the new
        model path.
        """
        if not _VERSION_RE.fullmatch(version):
            raise ValueError(f"bad version {version!r}")
        name_dir = self._name_dir(name)
        name_dir.mkdir(mode=0o700, exist_ok=True)
        vdir = name_dir / version
        if vdir.is_dir() and (vdir / MODEL_FILE).is_file():
            # the same folded graph again (the version is its hash): only the record changes
            os.unlink(model_file)
            if original_file is not None and not (vdir / ORIGINAL_FILE).is_file():
                os.replace(original_file, vdir / ORIGINAL_FILE)
            tmp = vdir / f".{RECORD_FILE}.tmp"
            _write_durably(tmp, json.dumps(record, indent=1).encode())
            os.replace(tmp, vdir / RECORD_FILE)
        else:
            staged = self.scratch_dir("stage-")
            os.replace(model_file, staged / MODEL_FILE)
            if original_file is not None:
                os.replace(original_file, staged / ORIGINAL_FILE)
            _write_durably(staged / RECORD_FILE, json.dumps(record, indent=1).encode())
            _fsync_path(staged / MODEL_FILE)
            _fsync_path(staged)
            if vdir.exists():  # a leftover without its model file: never current
                _remove(vdir)
            os.replace(staged, vdir)
            _fsync_path(name_dir)
        previous = self.current_version(name)
        if previous is not None and previous != version:
            # before the commit point: a kill in between leaves PREVIOUS naming the current one
            self._set_pointer(name_dir, PREVIOUS_FILE, previous)
        self._set_pointer(name_dir, CURRENT_FILE, version)
        return vdir / MODEL_FILE

    def _set_pointer(self, name_dir: Path, pointer: str, version: str) -> None:
        tmp = name_dir / f".{pointer}.tmp"
        _write_durably(tmp, (version + "\n").encode())
        os.replace(tmp, name_dir / pointer)  # for CURRENT: the commit point of a deployment
        _fsync_path(name_dir)

    def previous(self, name: str) -> StoredModel:
        """The version a rollback would serve."""
        version = self.previous_version(name)
        vdir = self._name_dir(name) / version if version else None
        if version is None or version == self.current_version(name) or not vdir.is_dir():
            raise NotFound(f"model {name!r} has no previous version to roll back to")
        record = json.loads((vdir / RECORD_FILE).read_text())
        return StoredModel(name, version, vdir / MODEL_FILE, record)

    def rollback(self, name: str) -> StoredModel:
        """Make the previous version current; the one current until now becomes previous, so a
        second rollback undoes the first."""
        target = self.previous(name)
        name_dir = self._name_dir(name)
        current = self.current_version(name)
        self._set_pointer(name_dir, CURRENT_FILE, target.version)  # the commit point
        if current is not None:
            self._set_pointer(name_dir, PREVIOUS_FILE, current)
        return target

    def prune(self, name: str) -> None:
        """Remove the versions that are neither current nor previous (after a swap)."""
        keep = {self.current_version(name), self.previous_version(name)}
        for p in self._name_dir(name).iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def delete(self, name: str) -> None:
        name_dir = self._name_dir(name)
        if self.current_version(name) is None:
            raise NotFound(f"model {name!r} is not deployed")
        trash = self.scratch_dir("trash-")
        os.replace(name_dir, trash / name)  # the commit point of a deletion
        _fsync_path(self.models_dir)
        shutil.rmtree(trash, ignore_errors=True)

    # -- start-up ----------------------------------------------------------------------------
    def recover(self) -> list[StoredModel]:
        """Clean what an interrupted run left behind; return the deployed models."""
        self.open()
        for p in self.tmp_dir.iterdir():
            _remove(p)
        deployed = []
        for p in self.models_dir.iterdir():
            if not p.is_dir() or not _NAME_RE.fullmatch(p.name):
                _remove(p)
                continue
            try:
                model = self.get(p.name)
                if not model.model_path.is_file():
                    raise FileNotFoundError(model.model_path)
            except (NotFound, FileNotFoundError, json.JSONDecodeError) as exc:
                logger.warning("store: removing incomplete model %s (%s)", p.name, exc)
                _remove(p)
                continue
            self.prune(p.name)
            for stray in p.iterdir():
                if stray.is_file() and stray.name not in (CURRENT_FILE, PREVIOUS_FILE):
                    stray.unlink()
            deployed.append(model)
        return deployed

    def deployed(self) -> list[StoredModel]:
        """The current models, read without changing anything (for read-only replicas, which
        must not clean up a deployment the writer has in progress)."""
        out = []
        for name in self.names() if self.models_dir.is_dir() else []:
            try:
                model = self.get(name)
            except (NotFound, FileNotFoundError, json.JSONDecodeError):
                continue  # being written or deleted by the writer right now
            if model.model_path.is_file():
                out.append(model)
        return out

    def is_fresh(self) -> bool:
        """True for a store that never held anything (the first start)."""
        return not (self.root / "initialized").exists()

    def mark_initialized(self) -> None:
        _write_durably(self.root / "initialized", b"1\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
