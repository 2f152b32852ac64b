"""The on-disk repository: atomic deploys, recovery after an interrupted run, safe names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import BadRequest, NotFound
from service.store import CURRENT_FILE, PREVIOUS_FILE, ModelStore, validate_name


@pytest.fixture
def store(tmp_path) -> ModelStore:
    s = ModelStore(tmp_path / "store")
    s.open()
    return s


def put(store: ModelStore, name: str, version: str, content: bytes = b"graph") -> Path:
    scratch = store.scratch_dir("test-")
    (scratch / "folded.onnx").write_bytes(content)
    return store.deploy(name, version, scratch / "folded.onnx", {"name": name, "v": version})


def test_deploy_then_redeploy_keeps_the_current_and_the_previous_version(store):
    put(store, "m", "aa", b"one")
    put(store, "m", "bb", b"two")
    put(store, "m", "cc", b"three")
    store.prune("m")
    got = store.get("m")
    assert got.version == "cc" and got.model_path.read_bytes() == b"three"
    listed = sorted(p.name for p in (store.models_dir / "m").iterdir())
    assert listed == [CURRENT_FILE, PREVIOUS_FILE, "bb", "cc"]  # kept for a rollback


def test_rollback_serves_the_previous_version_and_a_second_one_undoes_it(store):
    put(store, "m", "aa", b"one")
    with pytest.raises(NotFound, match="no previous version"):
        store.rollback("m")
    put(store, "m", "bb", b"two")
    assert store.rollback("m").version == "aa"
    assert store.get("m").model_path.read_bytes() == b"one"
    store.prune("m")
    assert store.rollback("m").version == "bb"
    assert store.recover()[0].version == "bb"  # recovery keeps both versions and the pointer
    assert store.previous("m").version == "aa"


def test_same_version_again_updates_the_record_in_place(store):
    put(store, "m", "aa")
    scratch = store.scratch_dir("t-")
    (scratch / "f").write_bytes(b"graph")
    store.deploy("m", "aa", scratch / "f", {"name": "m", "note": "second"})
    assert store.get("m").record["note"] == "second"


def test_recover_drops_what_a_kill_left_behind(store):
    put(store, "kept", "aa")
    # a kill between renaming a new version into place and switching CURRENT
    (store.models_dir / "kept" / "bb").mkdir()
    (store.models_dir / "kept" / "bb" / "model.onnx").write_bytes(b"new")
    # a kill before the first CURRENT of a new name was written
    (store.models_dir / "half").mkdir()
    (store.models_dir / "half" / "cc").mkdir()
    # scratch of an upload in progress
    (store.scratch_dir("upload-") / "upload").write_bytes(b"partial")

    deployed = ModelStore(store.root).recover()

    assert [(m.name, m.version) for m in deployed] == [("kept", "aa")]
    assert not (store.models_dir / "half").exists()
    assert not (store.models_dir / "kept" / "bb").exists()
    assert list(store.tmp_dir.iterdir()) == []


def test_delete_removes_the_model_atomically(store):
    put(store, "m", "aa")
    store.delete("m")
    assert not (store.models_dir / "m").exists()
    with pytest.raises(NotFound):
        store.get("m")
    with pytest.raises(NotFound):
        store.delete("m")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../etc",
        "a/b",
        "a\\b",
        ".hidden",
        "a..b",
        "x\x00y",
        "x\ny",
        "-x",
        "a" * 129,
        "/abs",
        "ok name",
    ],
)
def test_validate_name_rejects_path_like_names(name):
    with pytest.raises(BadRequest, match="invalid model name"):
        validate_name(name)


@given(st.text(max_size=40))
def test_any_accepted_name_stays_inside_the_store(name):
    root = Path("/srv/store/models")
    try:
        validate_name(name)
    except BadRequest:
        return
    assert (root / name).resolve().parent == root
