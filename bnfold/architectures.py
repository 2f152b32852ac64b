"""Architectures by name, built without weights: ``zoo:NAME``, ``torchvision:NAME``, ``timm:NAME``.

Users fine-tune a torchvision or timm architecture and keep its weights as safetensors. This
module turns a name and constructor arguments into the untrained ``nn.Module`` those weights
belong to, and loads the weights into it, refusing anything that does not fit. Nothing here
runs user code or unpickles: names come from the libraries' own model lists, constructor
arguments from a closed list of names and value types, and weights are never fetched (torchvision
with ``weights=None``, timm with ``pretrained=False``).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ARGUMENTS",
    "Architecture",
    "ArchitectureError",
    "load_weights",
    "parse_architecture",
]

SOURCES = ("zoo", "torchvision", "timm")


class ArchitectureError(ValueError):
    """A name, argument or weights file that cannot make the model; the message says why."""


@dataclass(frozen=True)
class _Argument:
    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    sources: tuple[str, ...] = ("torchvision", "timm")

    def check(self, key: str, value: Any) -> Any:
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ArchitectureError(
                f"arch_args[{key!r}] must be {self.kind.__name__}, got {json.dumps(value)}"
            )
        if self.choices and value not in self.choices:
            raise ArchitectureError(f"arch_args[{key!r}] must be one of {list(self.choices)}")
        if self.low is not None and not self.low <= value <= self.high:
            raise ArchitectureError(
                f"arch_args[{key!r}] must be between {self.low:g} and {self.high:g}, got {value}"
            )
        return float(value) if self.kind is float else value


# Constructor arguments a user may set: what changes the shape of the weights or the head, and
# nothing that loads, downloads or names a file (pretrained, weights, checkpoint_path, ...).
ARGUMENTS: dict[str, _Argument] = {
    "num_classes": _Argument(int, 1, 100_000),
    "in_chans": _Argument(int, 1, 64, sources=("timm",)),
    "global_pool": _Argument(str, choices=("avg", "max", "avgmax", "catavgmax"), sources=("timm",)),
    "drop_rate": _Argument(float, 0.0, 1.0, sources=("timm",)),
    "width_mult": _Argument(float, 0.1, 4.0, sources=("torchvision",)),
    "aux_logits": _Argument(bool, sources=("torchvision",)),
}

_TORCHVISION_INPUT_SIZE = {"inception_v3": 299}


@dataclass(frozen=True)
class Architecture:
    """An architecture and its constructor arguments: builds the untrained module."""

    source: str  # "zoo", "torchvision" or "timm"
    name: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"{self.source}:{self.name}"

    def build(self) -> nn.Module:
        """The module in eval mode: torchvision's and timm's random initialization, the zoo's
        shipped weights (uploaded weights replace every tensor either way)."""
        try:
            if self.source == "zoo":
                import models

                model = models.build(self.name)
            elif self.source == "torchvision":
                import torchvision

                model = torchvision.models.get_model(self.name, weights=None, **self.args)
            else:
                import timm

                model = timm.create_model(self.name, pretrained=False, **self.args)
        except TypeError as exc:
            raise ArchitectureError(f"{self.spec} does not take these arch_args: {exc}") from None
        return model.eval()

    def input_shapes(self) -> list[tuple[int, ...]]:
        """Each input's shape with batch 1, as the architecture is usually run."""
        if self.source == "zoo":
            import models

            return models.input_shapes(self.name)
        if self.source == "torchvision":
            size = _TORCHVISION_INPUT_SIZE.get(self.name, 224)
            return [(1, 3, size, size)]
        import timm

        channels, height, width = timm.get_pretrained_cfg_value(self.name, "input_size") or (
            3,
            224,
            224,
        )
        return [(1, self.args.get("in_chans", channels), height, width)]

    def example_inputs(
        self, batch: int = 2, shapes: list[tuple[int, ...]] | None = None
    ) -> tuple[Tensor, ...]:
        """Inputs to trace and verify with: the zoo's own, else seeded standard normal noise."""
        if self.source == "zoo" and shapes is None:
            import models

            return models.example_inputs(self.name, batch=batch)
        generator = torch.Generator().manual_seed(0)
        return tuple(
            torch.randn(batch, *shape[1:], generator=generator)
            for shape in (shapes or self.input_shapes())
        )


def parse_architecture(text: str, args: str | dict[str, Any] | None = None) -> Architecture:
    """``zoo:NAME`` (or a bare zoo name), ``torchvision:NAME`` or ``timm:NAME``, with ``args``
    as a JSON object (text or dict) of constructor arguments from ``ARGUMENTS``."""
    source, sep, name = text.strip().partition(":")
    if not sep:
        source, name = "zoo", source
    if source not in SOURCES:
        raise ArchitectureError(
            f"unknown architecture source {source!r} in {text!r}; use zoo:NAME, "
            "torchvision:NAME or timm:NAME"
        )
    known = _names(source)
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}" if close else ""
        listed = f": {', '.join(sorted(known))}" if source == "zoo" else ""
        raise ArchitectureError(
            f"unknown architecture {source}:{name}{hint} "
            f"({len(known)} {source} architectures known{listed})"
        )
    return Architecture(source, name, _arguments(source, args))


def load_weights(model: nn.Module, state: dict[str, Tensor], spec: str) -> nn.Module:
    """Load a state dict strictly: every key, every shape and kind; the message lists misfits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {list(state[key].shape)} (expected {list(expected[key].shape)})"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    kinds = [
        f"{key} {state[key].dtype} (expected {expected[key].dtype})"
        for key in sorted(set(state) & set(expected))
        if state[key].is_floating_point() != expected[key].is_floating_point()
    ]
    problems = []
    for what, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong),
        ("wrong dtypes", kinds),
    ):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise ArchitectureError(
            f"the weights do not fit architecture {spec}: {'; '.join(problems)}"
            + _classes_hint(state, expected, missing or unexpected or kinds)
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _classes_hint(state: dict, expected: dict, other_misfits: list) -> str:
    """Where only the classifier's output size differs, the num_classes the weights were made
    for: every misfit differs in its first dimension alone, all by the same two counts, and
    no tensor of the misfit layers fits at the architecture's count (fc.weight at 5 classes
    beside fc.bias at 10 are not weights for 5 classes)."""
    misfits = {
        key: (tuple(state[key].shape), tuple(expected[key].shape))
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    }
    if other_misfits or not misfits:
        return ""
    pairs = {(got[0], want[0]) for got, want in misfits.values() if got[1:] == want[1:]}
    if len(pairs) != 1 or any(got[1:] != want[1:] for got, want in misfits.values()):
        return ""
    n, architecture_count = pairs.pop()
    layers = {key.rpartition(".")[0] for key in misfits}
    for key, value in expected.items():
        fits = key not in misfits and value.dim() and value.shape[0] == architecture_count
        if fits and key.rpartition(".")[0] in layers:
            return ""
    return (
        f'; they score {n} classes: give {{"num_classes": {n}}} as arch_args (--arch-args on '
        "the command line)"
    )


def _names(source: str) -> set[str]:
    if source == "zoo":
        import models

        return set(models.names())
    if source == "torchvision":
        import torchvision

        return set(torchvision.models.list_models(module=torchvision.models))
    import timm

    return set(timm.list_models())


def _arguments(source: str, raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArchitectureError(f"arch_args is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ArchitectureError(
            f'arch_args must be a JSON object like {{"num_classes": 10}}, got {json.dumps(raw)}'
        )
    if raw and source == "zoo":
        raise ArchitectureError("zoo architectures take no arch_args")
    out = {}
    for key, value in raw.items():
        argument = ARGUMENTS.get(key)
        if argument is None or source not in argument.sources:
            allowed = sorted(k for k, a in ARGUMENTS.items() if source in a.sources)
            raise ArchitectureError(
                f"arch_args[{key!r}] is not accepted for {source} architectures; "
                f"allowed: {', '.join(allowed)}"
            )
        out[key] = argument.check(key, value)
    return out
