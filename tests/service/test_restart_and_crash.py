"""The store across restarts and kill -9; the token; the command line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.service.support import ROOT, TOKEN, conv_bn_model, cuda_usable, upload


def deployed(server) -> dict[str, str]:
    with server.client() as api:
        return {m["name"]: m["version"] for m in api.get("/v1/models").json()["data"]}


def assert_store_clean(store) -> None:
    assert list((store / "tmp").iterdir()) == []
    for name_dir in (store / "models").iterdir():
        want = {"CURRENT", (name_dir / "CURRENT").read_text().strip()}
        if (name_dir / "PREVIOUS").is_file():  # the version a rollback would serve
            want |= {"PREVIOUS", (name_dir / "PREVIOUS").read_text().strip()}
        assert sorted(p.name for p in name_dir.iterdir()) == sorted(want)


def test_restart_brings_back_every_model_at_the_same_version(start_server, tmp_path):
    server = start_server()
    t0 = time.monotonic()
    with server.client() as api:
        for i, name in enumerate(["alpha", "beta"]):
            assert upload(api, name, conv_bn_model(seed=i).SerializeToString()).status_code == 201
    uploads_s = time.monotonic() - t0
    before = deployed(server)
    server.stop()

    again = start_server(store=server.store)
    loading_s = again.ready_after_s - server.ready_after_s
    print(
        f"\nrestart: ready {again.ready_after_s:.1f} s after start, {loading_s:.1f} s more than "
        f"an empty store; the two uploads took {uploads_s:.1f} s"
    )
    # the stored folds are loaded, not made again (that would cost about what the uploads did);
    # compared within the run, so a busy machine moves both
    assert loading_s < uploads_s / 2
    assert deployed(again) == before
    with again.client() as api:
        r = api.post(
            "/v2/models/beta/infer",
            json={
                "inputs": [
                    {"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.5] * 192}
                ]
            },
        )
        assert r.status_code == 200 and r.json()["model_version"] == before["beta"]
    assert_store_clean(server.store)


def slow_upload(server, name: str, data: bytes, started: threading.Event) -> None:
    boundary = "slow"

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="m.onnx"\r\n\r\n'
        ).encode()
        yield data[: len(data) // 2]
        started.set()
        time.sleep(30)  # the server dies meanwhile
        yield data[len(data) // 2 :]
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        with server.client() as api:
            api.post(
                "/v1/models",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
    except httpx.HTTPError:
        pass


def test_kill_9_mid_upload_keeps_the_previous_version(start_server):
    server = start_server()
    with server.client() as api:
        v1 = upload(api, "m", conv_bn_model(seed=1).SerializeToString()).json()["version"]
    started = threading.Event()
    t = threading.Thread(
        target=slow_upload,
        args=(server, "m", conv_bn_model(seed=2).SerializeToString(), started),
        daemon=True,
    )
    t.start()
    assert started.wait(30)
    time.sleep(0.5)  # the first half is in the server's scratch
    server.kill()

    again = start_server(store=server.store)
    assert deployed(again) == {"m": v1}
    assert_store_clean(server.store)


def processes_mentioning(path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if str(path).encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_kill_9_mid_fold_keeps_the_previous_version(start_server):
    server = start_server()
    with server.client() as api:
        v1 = upload(api, "m", conv_bn_model(seed=1).SerializeToString()).json()["version"]

    def post_second():
        try:
            with server.client() as api:
                upload(api, "m", conv_bn_model(seed=2).SerializeToString())
        except httpx.HTTPError:
            pass

    threading.Thread(target=post_second, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the worker has its job: folding is under way
        if list((server.store / "tmp").glob("upload-*/job.json")):
            break
        time.sleep(0.02)
    else:
        pytest.fail("the upload never reached the worker")
    time.sleep(1)  # the worker is loading its libraries or folding
    assert processes_mentioning(server.store)
    server.kill()
    time.sleep(0.5)
    assert processes_mentioning(server.store) == []  # the worker died with the server

    again = start_server(store=server.store)
    assert deployed(again) == {"m": v1}
    assert_store_clean(server.store)


def test_generated_token_is_kept_private_and_reused(start_server, tmp_path):
    server = start_server(BNFOLD_API_TOKEN="")
    token_file = server.store / "api_token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert server.log.read_text().count(token) == 1  # printed once, at generation
    with server.client(token) as api:
        assert api.get("/v1/models").status_code == 200
    with server.client(TOKEN) as api:
        assert api.get("/v1/models").status_code == 401
    server.stop()

    again = start_server(store=server.store, BNFOLD_API_TOKEN="")
    with again.client(token) as api:
        assert api.get("/v1/models").status_code == 200
    assert server.log.read_text().count(token) == 1


def _start_and_fail(store, *args: str) -> subprocess.CompletedProcess:
    """`python -m service` on any free port, with no BNFOLD_ setting but these, expected to stop
    at start-up: what it printed and its exit status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
    env.update(
        BNFOLD_STORE=str(store),
        BNFOLD_PORT="0",
        BNFOLD_GRPC_PORT="0",
        BNFOLD_DEPLOY_DEFAULTS="0",
        PYTHONPATH=str(ROOT),
    )
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_require_gpu_refuses_to_fall_back_to_the_cpu(tmp_path):
    if cuda_usable():
        pytest.skip("CUDA works here: nothing to refuse")
    proc = _start_and_fail(tmp_path / "s", "--require-gpu")
    assert proc.returncode != 0
    assert "require_gpu" in proc.stderr and "CUDA" in proc.stderr


def test_cli_options_fall_back_to_environment():
    from service.cli import build_parser
    from service.settings import Settings

    env = {
        "BNFOLD_PORT": "9100",
        "BNFOLD_HOST": "0.0.0.0",
        "BNFOLD_REQUIRE_GPU": "yes",
        "BNFOLD_MAX_UPLOAD_BYTES": "123",
    }
    args = build_parser().parse_args(["--port", "9200"])
    s = Settings.from_env(env, port=args.port, host=args.host, require_gpu=args.require_gpu)
    assert (s.port, s.host, s.require_gpu, s.max_upload_bytes) == (9200, "0.0.0.0", True, 123)
    with pytest.raises(ValueError, match="BNFOLD_PORT"):
        Settings.from_env({"BNFOLD_PORT": "eighty"})
    with pytest.raises(ValueError, match=r"port \(--port, BNFOLD_PORT; 0: any free port\) 65536"):
        Settings.from_env({}, port=65536)
    with pytest.raises(ValueError, match=r"gRPC port \(BNFOLD_GRPC_PORT; 0: no gRPC server\) -1"):
        Settings.from_env({"BNFOLD_GRPC_PORT": "-1"})
    assert Settings.from_env({}).cudnn_conv_algo_search == "HEURISTIC"
    s = Settings.from_env({"BNFOLD_CUDNN_CONV_ALGO_SEARCH": "exhaustive"})
    assert s.cudnn_conv_algo_search == "EXHAUSTIVE"
    with pytest.raises(ValueError, match="BNFOLD_CUDNN_CONV_ALGO_SEARCH='FASTEST'"):
        Settings.from_env({"BNFOLD_CUDNN_CONV_ALGO_SEARCH": "fastest"})


def test_a_store_that_cannot_be_made_is_one_line_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = _start_and_fail(blocker / "store")
    assert proc.returncode != 0
    assert f"bnfold cannot start: the store {blocker / 'store'}: Not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_importing_the_app_loads_no_model_library():
    code = (
        "import sys, service.app, service.cli; "
        "from service.app import create_app; from service.settings import Settings; "
        "create_app(Settings(store='/nonexistent/never-created')); "
        "print(sorted({'torch', 'onnxruntime', 'onnx', 'bnfold', 'models'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert not os.path.exists("/nonexistent/never-created")  # the factory touches no disk
