"""deploy/kserve/bnfold.yaml agrees with the Dockerfile and the app: port, user, probes, one
writer on the full image, read-only replicas on the slim one. tests/container/test_manifest.py
checks the same against the built images."""

from __future__ import annotations

import yaml

from service.app import create_app
from service.settings import Settings
from tests.service.support import ROOT


def _documents() -> dict[str, dict]:
    """The manifest's documents by name (two InferenceServices: HTTP and gRPC)."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/kserve/bnfold.yaml").open()))
    return {d["metadata"]["name"]: d for d in docs}


def test_kserve_manifest_matches_the_image_and_the_routes(tmp_path):
    docs = _documents()
    assert {name: d["kind"] for name, d in docs.items()} == {
        "bnfold-store": "PersistentVolumeClaim",
        "bnfold-writer": "Deployment",
        "bnfold": "InferenceService",
        "bnfold-grpc": "InferenceService",
    }
    assert docs["bnfold-store"]["spec"]["accessModes"] == ["ReadWriteMany"]
    writer = docs["bnfold-writer"]["spec"]
    assert writer["replicas"] == 1 and writer["strategy"]["type"] == "Recreate"
    (served,) = docs["bnfold"]["spec"]["predictor"]["containers"]
    (served_grpc,) = docs["bnfold-grpc"]["spec"]["predictor"]["containers"]
    defaults = Settings()
    for replica in (served, served_grpc):
        env = {e["name"]: e.get("value") for e in replica["env"]}
        assert Settings.from_env(env).store_readonly is True
        assert replica["image"].endswith("-slim")  # replicas only serve: no torch needed
        assert writer["template"]["spec"]["containers"][0]["image"] + "-slim" == replica["image"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {defaults.port} {defaults.grpc_port}" in dockerfile
    assert f"BNFOLD_GRPC_PORT={defaults.grpc_port}" in dockerfile
    assert "USER 10001:10001" in dockerfile
    assert 'VOLUME ["/store"]' in dockerfile and "\nFROM runtime AS slim\n" in dockerfile
    assert served["ports"] == [{"containerPort": defaults.port, "protocol": "TCP"}]
    # Knative routes HTTP/2 (gRPC) to a port named h2c, and probes only the port it serves
    grpc_port = {"name": "h2c", "containerPort": defaults.grpc_port, "protocol": "TCP"}
    assert served_grpc["ports"] == [grpc_port]
    assert served_grpc["readinessProbe"] == {"grpc": {"port": defaults.grpc_port}}
    assert served_grpc["livenessProbe"] == {"tcpSocket": {"port": defaults.grpc_port}}
    writer_ports = writer["template"]["spec"]["containers"][0]["ports"]
    assert [p["containerPort"] for p in writer_ports] == [defaults.port, defaults.grpc_port]
    for name in ("bnfold-writer", "bnfold", "bnfold-grpc"):
        spec = docs[name]["spec"]
        pod = spec["template"]["spec"] if name == "bnfold-writer" else spec["predictor"]
        assert pod["securityContext"]["runAsUser"] == 10001
    routes = set(create_app(Settings(store=tmp_path)).openapi()["paths"])
    for container in (served, writer["template"]["spec"]["containers"][0]):
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] in routes
    for container in (served, served_grpc, writer["template"]["spec"]["containers"][0]):
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/store", "/tmp"}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
