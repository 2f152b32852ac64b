"""The zoo by name: specs, builds from shipped weights, training runs, and a cache.

`build(name)` is the architecture with the weights shipped in `models/weights/` (see
`models.shipped`): the same bits on every machine. `train(name)` is the run those weights came
from: the module's initial weights from the global RNG seeded inside `torch.random.fork_rng`
(so the caller's RNG state is left as it was), the synthetic data and the steps from explicit
generators seeded from the spec (see `models.training`). A run is repeatable on one machine,
not across CPUs, which is why builds load rather than train. The first build of a name reads
its file; later builds copy the cached module, so no caller can change what the next one gets.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models import shipped
from models.cnn import SmallCNN, SmallCNNConfig
from models.decoder import Decoder, DecoderConfig
from models.mlp import MLP, MLPConfig
from models.mobilenet import MobileNetSmall, MobileNetSmallConfig
from models.preact import PreActNet, PreActNetConfig
from models.resnet import ResNetSmall, ResNetSmallConfig
from models.seq import SequenceCNN, SequenceCNNConfig
from models.synthetic import InputDistribution, sample_inputs
from models.training import TrainingLog, fit_loss, train_on_synthetic

__all__ = [
    "DEFAULT_MODELS",
    "ModelSpec",
    "UnknownModelError",
    "build",
    "clear_cache",
    "example_inputs",
    "get_spec",
    "fit_score",
    "input_shapes",
    "names",
    "train",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    make: Callable[[], nn.Module]  # untrained module; draws its init from the global RNG
    sample_shapes: tuple[tuple[int, ...], ...]  # per input, one sample without the batch dim
    seed: int
    description: str


_SPECS = (
    ModelSpec(
        "mlp_bn_after_act",
        lambda: MLP(MLPConfig(bn_after_act=True)),
        ((300,),),
        seed=1001,
        description="MLP 300-200-100-50-10, Linear -> LeakyReLU -> BatchNorm1d",
    ),
    ModelSpec(
        "mlp_bn_before_act",
        lambda: MLP(MLPConfig(bn_after_act=False)),
        ((300,),),
        seed=1002,
        description="MLP 300-200-100-50-10, Linear -> BatchNorm1d -> LeakyReLU",
    ),
    ModelSpec(
        "cnn_conv_bn_relu",
        lambda: SmallCNN(SmallCNNConfig()),
        ((3, 32, 32),),
        seed=1003,
        description="Conv-BN-ReLU stages with max pooling and a Linear head",
    ),
    ModelSpec(
        "resnet_small",
        lambda: ResNetSmall(ResNetSmallConfig()),
        ((3, 16, 16),),
        seed=1004,
        description="ResNet with BasicBlocks, one with a 1x1 conv + BN downsample shortcut",
    ),
    ModelSpec(
        "mobilenet_small",
        lambda: MobileNetSmall(MobileNetSmallConfig()),
        ((3, 16, 16),),
        seed=1005,
        description="MobileNet: depthwise conv + BN + ReLU6, pointwise conv + BN + ReLU6",
    ),
    ModelSpec(
        "preact_net",
        lambda: PreActNet(PreActNetConfig()),
        ((3, 16, 16),),
        seed=1006,
        description="pre-activation ResNet: BN -> ReLU -> Conv, then BN -> ReLU -> pool -> Linear",
    ),
    ModelSpec(
        "convtranspose_decoder",
        lambda: Decoder(DecoderConfig()),
        ((16,),),
        seed=1007,
        description="latent -> Linear -> ConvTranspose2d (grouped, then plain) -> BN -> ReLU",
    ),
    ModelSpec(
        "conv1d_seq",
        lambda: SequenceCNN(SequenceCNNConfig()),
        ((8, 64),),
        seed=1008,
        description="Conv1d -> BatchNorm1d -> ReLU stack, global average pool, Linear",
    ),
)
_ZOO = {spec.name: spec for spec in _SPECS}

DEFAULT_MODELS: tuple[str, ...] = ("mlp_bn_after_act", "resnet_small")

_cache: dict[str, nn.Module] = {}
_cache_lock = threading.Lock()


class UnknownModelError(KeyError):
    def __init__(self, name: str) -> None:
        self.name = name
        self.valid_names = names()
        super().__init__(f"unknown model {name!r}; valid names: {', '.join(self.valid_names)}")

    def __str__(self) -> str:
        # KeyError's own __str__ would repr() the message and wrap it in quotes
        return str(self.args[0])


def names() -> list[str]:
    """All zoo names, in a stable order."""
    return [spec.name for spec in _SPECS]


def get_spec(name: str) -> ModelSpec:
    try:
        return _ZOO[name]
    except KeyError:
        raise UnknownModelError(name) from None


def input_shapes(name: str) -> list[tuple[int, ...]]:
    """Shape of every input of the model, with a batch dim of 1 first."""
    return [(1, *shape) for shape in get_spec(name).sample_shapes]


def example_inputs(name: str, batch: int = 2) -> tuple[Tensor, ...]:
    """Deterministic inputs from the distribution the model was trained on."""
    spec = get_spec(name)
    generator = torch.Generator().manual_seed(spec.seed + 2)
    # normal tensors even for a caller in inference mode, so that they can enter autograd later
    with torch.inference_mode(False):
        xs, _ = sample_inputs(_input_distributions(spec), batch, generator)
    return xs


def build(name: str) -> nn.Module:
    """The trained model from its shipped weights, in eval mode: a fresh copy on every call."""
    spec = get_spec(name)
    # a copy taken in inference mode would hold inference tensors, which can never be trained
    with _cache_lock, torch.inference_mode(False):
        if name not in _cache:
            _cache[name] = shipped.load_into(name, _architecture(spec))
        return copy.deepcopy(_cache[name])


def train(name: str) -> tuple[nn.Module, TrainingLog]:
    """Run the zoo's short training for `name` from scratch (the run behind its weights)."""
    spec = get_spec(name)
    start = time.perf_counter()
    # forked, in case a layer draws from the global RNG in train mode (none does today)
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        model = _architecture(spec)
        generator = torch.Generator().manual_seed(spec.seed + 1)
        log = train_on_synthetic(model, _input_distributions(spec), generator)
    logger.info(
        "trained %s in %.2fs: loss %.4f -> %.4f over %d steps, fit %.4f",
        spec.name,
        time.perf_counter() - start,
        log.first_loss,
        log.last_loss,
        log.steps,
        log.fit_loss,
    )
    return model, log


def fit_score(name: str, model: nn.Module) -> float:
    """Loss of any weights for `name` on its training run's task (lower is better)."""
    spec = get_spec(name)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    return fit_loss(model, _input_distributions(spec), generator)


def clear_cache() -> None:
    """Forget built models, so that the next build of each name reads its file again."""
    with _cache_lock:
        _cache.clear()


def _input_distributions(spec: ModelSpec) -> list[InputDistribution]:
    generator = torch.Generator().manual_seed(spec.seed)
    return [InputDistribution.seeded(shape, generator) for shape in spec.sample_shapes]


def _architecture(spec: ModelSpec) -> nn.Module:
    """The untrained module, its initialisation drawn from a seeded, forked global RNG."""
    with torch.random.fork_rng(devices=[]):
        # seeds the CPU generator only: torch.manual_seed would also seed CUDA generators,
        # whose state fork_rng(devices=[]) does not restore
        torch.random.default_generator.manual_seed(spec.seed)
        return spec.make()
