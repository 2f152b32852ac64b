"""Pre-exported ONNX graphs of the zoo's default models, shipped with the service.

A fresh store deploys the defaults at start. Exporting them with the dynamo exporter costs
3-6 s per model on a 2-core machine, which alone would keep `/v2/health/ready` past 10 s; the
shipped graphs are the same export, made once by

    python -m service.default_graphs

and still go through the whole ingest at start (fold_onnx, verify_onnx against the unfolded
graph, a session load). tests/service/test_default_graphs.py checks that each shipped graph
computes what a fresh build and export of its zoo model computes.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DIR", "shipped_graph", "write_graphs"]

DIR = Path(__file__).resolve().parent / "defaults"


def shipped_graph(architecture: str) -> Path | None:
    path = DIR / f"{architecture}.onnx"
    return path if path.is_file() else None


def write_graphs() -> list[Path]:
    import bnfold
    import models

    DIR.mkdir(exist_ok=True)
    written = []
    for name in models.DEFAULT_MODELS:
        path = DIR / f"{name}.onnx"
        bnfold.export_onnx(models.build(name), models.example_inputs(name, batch=2), path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_graphs():
        print(p)
