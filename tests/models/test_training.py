"""The short training run behind every zoo model, on a tiny net."""

from __future__ import annotations

import torch
from torch import nn

from models.synthetic import InputDistribution
from models.training import TrainingConfig, train_on_synthetic

CONFIG = TrainingConfig(steps=30, batch_size=16, dataset_size=64, lr=1e-2)


def tiny_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=0.3), nn.Linear(8, 2))


def train(model: nn.Module) -> tuple[nn.Module, float, float]:
    generator = torch.Generator().manual_seed(1)
    distributions = [InputDistribution.seeded((6,), generator)]
    log = train_on_synthetic(model, distributions, generator, CONFIG)
    return model, log.first_loss, log.last_loss


def test_train_on_synthetic_lowers_the_loss():
    _, first_loss, last_loss = train(tiny_net())
    assert last_loss < first_loss


def test_train_on_synthetic_leaves_eval_mode_and_restores_momentum():
    model, _, _ = train(tiny_net())
    (bn,) = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert not any(m.training for m in model.modules())
    assert bn.momentum == 0.3
    assert bn.num_batches_tracked.item() == CONFIG.steps
    assert all(p.grad is None for p in model.parameters())


class BatchMeanRecorder(nn.Module):
    """Identity that remembers the mean of every batch it sees in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_means: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.batch_means.append(x.detach().mean(0))
        return x


def test_train_on_synthetic_running_mean_is_the_average_of_batch_means():
    # momentum=None during training makes running_mean the plain average over all steps
    model = tiny_net()
    recorder = BatchMeanRecorder()
    model.insert(1, recorder)
    model, _, _ = train(model)
    assert len(recorder.batch_means) == CONFIG.steps
    expected = torch.stack(recorder.batch_means).mean(0)
    torch.testing.assert_close(model[2].running_mean, expected)


def test_train_on_synthetic_draws_nothing_from_the_global_rng():
    rng_before = torch.get_rng_state()
    train(tiny_net())
    assert torch.equal(torch.get_rng_state(), rng_before)
