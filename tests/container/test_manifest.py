"""deploy/kserve/bnfold.yaml against the built images: the port they expose, the user they
run as, the volume they declare, and the path their HEALTHCHECK probes."""

from __future__ import annotations

import yaml

from tests.container.conftest import FULL, SLIM, podman
from tests.service.support import ROOT


def manifest_containers() -> list[tuple[str, dict]]:
    """(image tag, container with its pod's securityContext) of the writer and both replicas."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/kserve/bnfold.yaml").open()))
    found = []
    for doc in docs:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "InferenceService":
            pod = doc["spec"]["predictor"]
        else:
            continue
        container = {**pod["containers"][0], "pod": pod["securityContext"]}
        found.append((container["image"].rsplit("/", 1)[-1], container))
    return found


def test_kserve_manifest_matches_the_built_images(full_image, slim_image):
    images = {FULL: full_image, SLIM: slim_image}
    containers = manifest_containers()
    assert sorted(tag for tag, _ in containers) == [FULL, SLIM, SLIM]
    for tag, container in containers:
        config = images[tag]["Config"]
        exposed = sorted(int(p.removesuffix("/tcp")) for p in config["ExposedPorts"])
        http_port, grpc_port = exposed  # the image's BNFOLD_PORT and BNFOLD_GRPC_PORT
        env = dict(e.split("=", 1) for e in config["Env"])
        assert (int(env["BNFOLD_PORT"]), int(env["BNFOLD_GRPC_PORT"])) == (http_port, grpc_port)
        ports = [p["containerPort"] for p in container["ports"]]
        assert set(ports) <= {http_port, grpc_port}, ports
        uid, gid = config["User"].split(":")
        assert (container["pod"]["runAsUser"], container["pod"]["runAsGroup"]) == (
            int(uid),
            int(gid),
        )
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/store" in {m["mountPath"] for m in container["volumeMounts"]}
        assert list(config["Volumes"]) == ["/store"]
        if ports == [grpc_port]:  # the gRPC replica: probed on its gRPC port
            assert container["readinessProbe"] == {"grpc": {"port": grpc_port}}
            continue
        # the image's HEALTHCHECK asks the readiness path; the manifest probes the same one
        probe = podman(
            "run",
            "--rm",
            "--network=none",
            "--entrypoint",
            "python",
            tag,
            "-c",
            "import inspect, service.healthcheck as h; print(inspect.getsource(h.main))",
        ).stdout
        ready = container["readinessProbe"]["httpGet"]
        assert '/v2/health/ready"' in probe
        assert ready == {"path": "/v2/health/ready", "port": http_port}
        live = container["livenessProbe"]["httpGet"]
        assert live == {"path": "/v2/health/live", "port": http_port}
