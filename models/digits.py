"""A small BatchNorm CNN trained on real data: scikit-learn's handwritten digits.

The data set ships inside scikit-learn (1,797 grey 8x8 images of the digits 0-9; nothing is
downloaded), so accuracy here is a real accuracy: what quantization (`bnfold optimize`) and
covariate shift (drift monitoring, recalibration) cost and recover is measured on it. The split
is a fixed permutation (integer arithmetic, the same on every machine); the trained weights ship
in `models/weights/digits_cnn.safetensors` like the zoo's, since a training run is not the same
on every CPU.

    from models import digits
    split = digits.load_split()                 # train 1,258 / test 539, pixels scaled to [0, 1]
    model = digits.build()                      # eval mode, shipped weights
    deeper = digits.build("digits_resnet")      # or "digits_mobilenet": residual, depthwise
    digits.accuracy(model, split.test_x, split.test_y)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from models import shipped
from models.training import TrainingConfig, _Adam, _one_thread

__all__ = [
    "ARCHITECTURES",
    "NAME",
    "DigitsCNN",
    "DigitsMobileNet",
    "DigitsResNet",
    "DigitsSplit",
    "accuracy",
    "build",
    "load_split",
    "train",
]

NAME = "digits_cnn"
INPUT_SHAPE = (1, 1, 8, 8)


@dataclass(frozen=True, eq=False)
class DigitsSplit:
    train_x: Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    train_y: Tensor  # [N] int64
    test_x: Tensor
    test_y: Tensor


def load_split(test_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """The digits, shuffled by a fixed permutation and split into train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.RandomState(seed).permutation(len(data.target))
    x = torch.from_numpy((data.data[order] / 16.0).astype(np.float32)).view(-1, 1, 8, 8)
    y = torch.from_numpy(data.target[order].astype(np.int64))
    n_test = round(len(y) * test_fraction)
    return DigitsSplit(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max pool to 4x4, Conv-BN-ReLU, global average pool, Linear: 10 logits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, width),  # [N, 16, 8, 8]
            *block(width, 2 * width),  # [N, 32, 8, 8]
            nn.MaxPool2d(2),  # [N, 32, 4, 4]
            *block(2 * width, 4 * width),  # [N, 64, 4, 4]
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # [N, 64]
        )
        self.classifier = nn.Linear(4 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _stem(width: int, activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), activation()
    )


def _stages(block, width: int) -> nn.Sequential:
    """Two blocks at 8x8 and `width` channels, two at 4x4 and twice the width."""
    return nn.Sequential(
        block(width, width, 1),
        block(width, width, 1),
        block(width, 2 * width, 2),
        block(2 * width, 2 * width, 1),
    )


class _BasicBlock(nn.Module):
    """ResNet's basic block: Conv-BN-ReLU, Conv-BN, plus the input (1x1 Conv-BN when the
    shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A ResNet in miniature: stem Conv-BN-ReLU, 4 basic blocks (8x8 at 16 channels, 4x4 at
    32), global average pool, Linear. 11 convs, 11 BNs, 4 residual adds."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = _stem(width, nn.ReLU)
        self.blocks = _stages(_BasicBlock, width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))))


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (no
    activation), plus the input when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class DigitsMobileNet(nn.Module):
    """A MobileNetV2 in miniature: stem Conv-BN-ReLU6, 4 inverted residuals (depthwise convs,
    linear bottlenecks, 2 residual adds), 1x1 Conv-BN-ReLU6, global average pool, Linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = _stem(width, nn.ReLU6)
        self.blocks = _stages(_InvertedResidual, width)
        self.head = nn.Sequential(
            nn.Conv2d(2 * width, 4 * width, 1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))))


# shipped name -> architecture: the CNN every other part uses, and two deeper ones for
# quantization's accuracy on residual and depthwise networks (bench/optimize.py)
ARCHITECTURES: dict[str, type[nn.Module]] = {
    NAME: DigitsCNN,
    "digits_resnet": DigitsResNet,
    "digits_mobilenet": DigitsMobileNet,
}


@dataclass(frozen=True)
class DigitsTrainingLog:
    steps: int
    first_loss: float
    last_loss: float
    train_accuracy: float
    test_accuracy: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


# epochs by architecture: the MobileNet stopped at 88.7% held out after 30 (99.1% after 60)
EPOCHS = {NAME: 30, "digits_resnet": 30, "digits_mobilenet": 60}


def train(
    seed: int = 0,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    name: str = NAME,
) -> tuple[nn.Module, DigitsTrainingLog]:
    """Train `name`'s architecture from scratch on the train split (seconds on one CPU
    thread for the CNN, under a minute for the deeper ones); `epochs` defaults to EPOCHS."""
    split = load_split()
    if epochs is None:
        epochs = EPOCHS.get(name, 30)
    with torch.random.fork_rng(devices=[]), _one_thread(), torch.inference_mode(False):
        torch.random.default_generator.manual_seed(seed)
        model = _architecture(name)()
        generator = torch.Generator().manual_seed(seed + 1)
        optimizer = _Adam(list(model.parameters()), TrainingConfig(lr=lr))
        losses = []
        model.train()
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(split.train_y), generator=generator)
                for start in range(0, len(order), batch_size):
                    index = order[start : start + batch_size]
                    if len(index) < 2:  # BN needs two samples for a batch variance
                        continue
                    loss = nn.functional.cross_entropy(
                        model(split.train_x[index]), split.train_y[index]
                    )
                    model.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
        model.zero_grad(set_to_none=True)
        model.eval()
    log = DigitsTrainingLog(
        steps=len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
        train_accuracy=accuracy(model, split.train_x, split.train_y),
        test_accuracy=accuracy(model, split.test_x, split.test_y),
    )
    return model, log


def _architecture(name: str) -> type[nn.Module]:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown digits model {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build(name: str = NAME) -> nn.Module:
    """The trained model from its shipped weights, in eval mode."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        return shipped.load_into(name, _architecture(name)())


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of `model` in eval mode, as a fraction."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    model.train(was_training)
    return (predicted == y).float().mean().item()
