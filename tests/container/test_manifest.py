"""deploy/kserve/bnfold.yaml against the built images: the port they expose, the user they
run as, the volume they declare, and the path their HEALTHCHECK probes."""

from __future__ import annotations

import yaml

from tests.container.conftest import FULL, SLIM, podman
from tests.service.support import ROOT


def manifest_containers() -> dict[str, dict]:
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/kserve/bnfold.yaml").open())}
    writer = docs["Deployment"]["spec"]["template"]["spec"]
    replica = docs["InferenceService"]["spec"]["predictor"]
    return {
        FULL: {**writer["containers"][0], "pod": writer["securityContext"]},
        SLIM: {**replica["containers"][0], "pod": replica["securityContext"]},
    }


def test_kserve_manifest_matches_the_built_images(full_image, slim_image):
    images = {FULL: full_image, SLIM: slim_image}
    for tag, container in manifest_containers().items():
        config = images[tag]["Config"]
        assert container["image"].rsplit("/", 1)[-1] == tag
        (exposed,) = config["ExposedPorts"]
        port = int(exposed.removesuffix("/tcp"))
        assert [p["containerPort"] for p in container["ports"]] == [port]
        uid, gid = config["User"].split(":")
        assert (container["pod"]["runAsUser"], container["pod"]["runAsGroup"]) == (
            int(uid),
            int(gid),
        )
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/store" in {m["mountPath"] for m in container["volumeMounts"]}
        assert list(config["Volumes"]) == ["/store"]
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
        assert '/v2/health/ready"' in probe and ready == {"path": "/v2/health/ready", "port": port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
