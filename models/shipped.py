"""The zoo's trained weights, shipped with the package as safetensors files.

`models.build(name)` loads `models/weights/NAME.safetensors`; it never trains. A run of the
zoo's short training differs from one CPU to another (see `models.training`), so the weights
of one run, made by `python -m models.train`, are what every machine uses. Each file carries
the run's record in its metadata: steps, losses, held-out loss, the CPU and torch it ran on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = ["DIR", "MissingWeightsError", "load_into", "path", "read_record", "save"]

DIR = Path(__file__).resolve().parent / "weights"


class MissingWeightsError(FileNotFoundError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"no shipped weights for zoo model {name!r} at {path(name)}; "
            f"make them with `python -m models.train {name}`"
        )


def path(name: str) -> Path:
    return DIR / f"{name}.safetensors"


def save(name: str, model: nn.Module, record: dict[str, Any]) -> Path:
    """Write every entry of the state dict (parameters and BN buffers) and the run's record."""
    DIR.mkdir(exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    target = path(name)
    save_file(state, str(target), metadata={"record": json.dumps(record, sort_keys=True)})
    return target


def load_into(name: str, model: nn.Module) -> nn.Module:
    """Load the shipped weights into `model` (strict: every key, every shape), in eval mode."""
    source = path(name)
    if not source.is_file():
        raise MissingWeightsError(name)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(source), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            state[key] = f.get_tensor(key)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_record(name: str) -> dict[str, Any]:
    source = path(name)
    if not source.is_file():
        raise MissingWeightsError(name)
    with safe_open(str(source), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("record", "{}"))
