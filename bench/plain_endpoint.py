"""The baseline a user would write by hand: FastAPI + onnxruntime, one run per request.

``POST /infer`` takes the input tensor as raw little-endian float32 bytes with its shape in the
``X-Shape`` header (``1,3,224,224``), or as JSON ``{"shape": [...], "data": [...]}``, and answers
the first output the same way; ``GET /health`` answers ``{"ok": true}``. No batching, no limits, no
metrics, onnxruntime on the event loop: the endpoint of a tutorial.

    python bench/plain_endpoint.py MODEL.onnx --port 8100
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request, Response


def create_app(model_path: str, providers: list[str]) -> FastAPI:
    session = ort.InferenceSession(model_path, providers=providers)
    input_name = session.get_inputs()[0].name
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/infer")
    async def infer(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            import json

            doc = json.loads(body)
            x = np.asarray(doc["data"], dtype=np.float32).reshape(doc["shape"])
            (y, *_) = session.run(None, {input_name: x})
            out = {"shape": list(y.shape), "data": y.reshape(-1).tolist()}
            return Response(json.dumps(out), media_type="application/json")
        shape = [int(d) for d in request.headers["x-shape"].split(",")]
        x = np.frombuffer(body, dtype="<f4").reshape(shape)
        (y, *_) = session.run(None, {input_name: x})
        return Response(
            y.astype("<f4").tobytes(),
            media_type="application/octet-stream",
            headers={"X-Shape": ",".join(map(str, y.shape))},
        )

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated")
    args = p.parse_args()
    app = create_app(args.model, args.providers.split(","))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
