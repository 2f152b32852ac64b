"""deploy/kserve/bnfold.yaml agrees with the Dockerfile and the app: port, user, probes, one
writer on the full image, read-only replicas on the slim one. tests/container/test_manifest.py
checks the same against the built images."""

from __future__ import annotations

import yaml

from service.app import create_app
from service.settings import Settings
from tests.service.support import ROOT


def test_kserve_manifest_matches_the_image_and_the_routes(tmp_path):
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/kserve/bnfold.yaml").open())}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "InferenceService"}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    writer = docs["Deployment"]["spec"]
    assert writer["replicas"] == 1 and writer["strategy"]["type"] == "Recreate"
    (served,) = docs["InferenceService"]["spec"]["predictor"]["containers"]
    env = {e["name"]: e.get("value") for e in served["env"]}
    assert Settings.from_env(env).store_readonly is True
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "EXPOSE 8000" in dockerfile and "USER 10001:10001" in dockerfile
    assert 'VOLUME ["/store"]' in dockerfile and "\nFROM runtime AS slim\n" in dockerfile
    assert served["ports"][0]["containerPort"] == 8000
    assert served["image"].endswith("-slim")  # replicas only serve: no torch needed
    assert writer["template"]["spec"]["containers"][0]["image"] + "-slim" == served["image"]
    for pod in (writer["template"]["spec"], docs["InferenceService"]["spec"]["predictor"]):
        assert pod["securityContext"]["runAsUser"] == 10001
    routes = set(create_app(Settings(store=tmp_path)).openapi()["paths"])
    for container in (served, writer["template"]["spec"]["containers"][0]):
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] in routes
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/store", "/tmp"}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
