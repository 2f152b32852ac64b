"""The short training run that gives every zoo model real BatchNorm statistics.

A zoo model is trained for a few dozen Adam steps, in train mode, on a fixed synthetic data
set (see `models.synthetic`), then put in eval mode. Two choices make the result useful to a
BatchNorm folder:

1. During the run every BN uses `momentum=None` (a cumulative average), so the running mean
   and variance are the average of the batch statistics of all steps rather than mostly the
   0 / 1 they were initialised with. The model's own momentum is restored afterwards.
2. Before the run every affine BN gets gamma ~ U(0.5, 1.5) and beta ~ U(-0.5, 0.5). From the
   default gamma = 1, beta = 0 a few dozen steps barely move them, and a fold that gets the
   affine part wrong would still look right.

The optimiser is a plain Adam (Kingma & Ba, 2014) written out here rather than torch.optim.Adam:
constructing any torch.optim optimiser imports torch._dynamo, which costs more (about 2 s on a
small machine) than a whole build.

The run is a function of its arguments alone on one machine. All data and initialisation draws
come from the generator passed in, never from the global RNG. And it runs on one thread: CPU
kernels split reductions by thread count, so the float32 rounding of a run would otherwise
depend on torch.get_num_threads() (and on a shared machine a second thread mostly waits for a
core). Across machines it is not: another CPU's kernels round sums differently and forty
steps of training amplify that (0.25 apart on a zoo model's outputs, AMD EPYC against Intel
Xeon). That is why the zoo ships the weights of one run (`models.weights`) rather than
retraining on every machine; a run is scored by its loss on a held-out set of the same task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.synthetic import InputDistribution, RandomTeacher, sample_inputs

__all__ = ["SyntheticTask", "TrainingConfig", "TrainingLog", "fit_loss", "train_on_synthetic"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 40
    batch_size: int = 32
    dataset_size: int = 256
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class TrainingLog:
    """What the run did, for logs and tests: the loss should have gone down. `fit_loss` is the
    finished model's, in eval mode, over the whole training set: the figure another run (on
    another machine) must reach, since its exact weights will differ."""

    steps: int
    first_loss: float
    last_loss: float
    fit_loss: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def train_on_synthetic(
    model: nn.Module,
    distributions: Sequence[InputDistribution],
    generator: torch.Generator,
    config: TrainingConfig = TrainingConfig(),  # noqa: B008 - frozen, so sharing is safe
) -> TrainingLog:
    """Train `model` in place on synthetic data, then leave it in eval mode."""
    # whatever autograd mode the caller is in, training needs gradients
    with _one_thread(), torch.inference_mode(False), torch.enable_grad():
        log = _run(model, distributions, generator, config)
    logger.debug("trained %s: %s", type(model).__name__, log)
    return log


@dataclass(frozen=True, eq=False)
class SyntheticTask:
    """The data of one training run: inputs and the teacher's targets.

    The zoo's runs are there to give BN real statistics, not to generalize (256 samples, 40
    steps: a held-out set scores no better than predicting 0), so a run is scored on the
    training set itself."""

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor

    @classmethod
    def draw(
        cls,
        model: nn.Module,
        distributions: Sequence[InputDistribution],
        generator: torch.Generator,
        config: TrainingConfig,
    ) -> SyntheticTask:
        """The run's first draws from `generator`: a function of the seed and shapes alone, so
        any weights can be scored on the task of a finished run."""
        xs, zs = sample_inputs(distributions, config.dataset_size, generator)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            output_shape = tuple(model(*(x[:2] for x in xs)).shape[1:])
        model.train(was_training)
        teacher = RandomTeacher([d.shape for d in distributions], output_shape, generator)
        return cls(xs, teacher(zs))

    def fit_loss(self, model: nn.Module) -> float:
        """Mean squared error of `model` in eval mode over the whole training set."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = nn.functional.mse_loss(model(*self.inputs), self.targets)
        model.train(was_training)
        return loss.item()


def fit_loss(
    model: nn.Module,
    distributions: Sequence[InputDistribution],
    generator: torch.Generator,
    config: TrainingConfig = TrainingConfig(),  # noqa: B008 - frozen, so sharing is safe
) -> float:
    """Score any weights on the task of the run that `generator` would start."""
    with _one_thread(), torch.inference_mode(False):
        return SyntheticTask.draw(model, distributions, generator, config).fit_loss(model)


def _run(
    model: nn.Module,
    distributions: Sequence[InputDistribution],
    generator: torch.Generator,
    config: TrainingConfig,
) -> TrainingLog:
    task = SyntheticTask.draw(model, distributions, generator, config)

    batch_norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    _spread_affine(batch_norms, generator)
    momenta = [bn.momentum for bn in batch_norms]
    for bn in batch_norms:
        bn.momentum = None

    optimizer = _Adam(list(model.parameters()), config)
    losses: list[float] = []
    model.train()
    for _ in range(config.steps):
        index = torch.randperm(config.dataset_size, generator=generator)[: config.batch_size]
        prediction = model(*(x[index] for x in task.inputs))
        loss = nn.functional.mse_loss(prediction, task.targets[index])
        model.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.zero_grad(set_to_none=True)
    model.eval()

    for bn, momentum in zip(batch_norms, momenta, strict=True):
        bn.momentum = momentum
    return TrainingLog(
        steps=config.steps,
        first_loss=losses[0],
        last_loss=losses[-1],
        fit_loss=task.fit_loss(model),
    )


@contextmanager
def _one_thread() -> Iterator[None]:
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(caller_threads)


class _Adam:
    """Adam with bias correction, no weight decay; skips parameters that got no gradient."""

    def __init__(self, params: list[nn.Parameter], config: TrainingConfig) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.config = config
        self.step_count = 0
        self.first_moments = [torch.zeros_like(p) for p in self.params]
        self.second_moments = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        beta1, beta2 = self.config.betas
        correction1 = 1 - beta1**self.step_count
        correction2 = 1 - beta2**self.step_count
        for p, m, v in zip(self.params, self.first_moments, self.second_moments, strict=True):
            if p.grad is None:
                continue
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = (v / correction2).sqrt_().add_(self.config.eps)
            p.addcdiv_(m, denominator, value=-self.config.lr / correction1)


def _spread_affine(batch_norms: Sequence[_BatchNorm], generator: torch.Generator) -> None:
    with torch.no_grad():
        for bn in batch_norms:
            if bn.affine:
                bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=generator))
                bn.bias.copy_(torch.empty_like(bn.bias).uniform_(-0.5, 0.5, generator=generator))
