"""The models loaded in this process, by name.

A deployment swaps the whole ``LoadedModel`` under the name in one assignment. A request takes
its reference once at the start, so requests in flight finish on the session they started with,
and the old session is freed when the last of them drops it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from service.errors import NotFound
from service.runtime.batcher import Batcher
from service.runtime.sessions import LoadedSession


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    record: dict[str, Any]  # what the store keeps: source, reports
    runtime: LoadedSession
    batcher: Batcher  # every request goes through it, batched or not

    @property
    def precision(self) -> str:
        """What the served graph computes in: "int8" for an optimized INT8 graph, else the
        graph's own float type (records from before ``optimize`` existed say nothing: fp32)."""
        return (self.record.get("precision") or {}).get("precision", "fp32")

    def public(self) -> dict[str, Any]:
        """The record, with what the session in this process says: signature and provider."""
        signature = self.runtime.signature
        return {
            **self.record,
            "precision": self.record.get("precision") or {"precision": self.precision},
            "inputs": [s.to_dict() for s in signature.inputs],
            "outputs": [s.to_dict() for s in signature.outputs],
            "execution_provider": self.runtime.provider,
            "batching": self.batcher.policy.to_dict(),
        }


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not deployed")
        return model

    def find(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def put(self, model: LoadedModel) -> None:
        with self._lock:
            self._models[model.name] = model

    def remove(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)

    def all(self) -> list[LoadedModel]:
        return sorted(self._models.values(), key=lambda m: m.name)
