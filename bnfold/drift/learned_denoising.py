"""A denoiser for white input noise learned from the noisy samples alone, given the noise
variance the first BN's variances show (``denoising.fit_noise``).

Recorrupted-to-Recorrupted (Pang et al., CVPR 2021): with y = x + n, n ~ N(0, s2 I), and a
fresh z ~ N(0, s2 I), the noises of y + a z and y - z / a are uncorrelated Gaussians, hence
independent, so

    E ||f(y + a z) - (y - z / a)||^2 = E ||f(y + a z) - x||^2 + const

and training f on pairs drawn from the noisy samples trains it against the clean images it
never sees (at noise (1 + a^2) s2: ``ALPHA`` trades that mismatch against the target's noise).
A linear filter (``denoising.wiener_filter``) is the best linear answer and keeps most of the
noise's harm on the digits (89.6% -> 92.3-93.9%, half-way is 94.2%); this small conv net
(``MEMBERS`` nets of ``WIDTH`` channels averaged, three 3x3 convs, ReLU between, the input
added back) is not linear and takes severe noise to 95-97% (docs/BENCHMARKS.md "Drift").

Training: Adam, ``STEPS`` steps of ``PIXELS_PER_STEP`` pixels (whole images, or random
``CROP`` x ``CROP`` crops of larger ones, so the cost does not grow with the image), flipped
and transposed at random (white noise has no orientation); one seeded generator, the global
random state untouched. The inputs are standardized per channel for training and the
standardization folded into the first and last convs; every conv pads by reflection, so the
fold is exact at the borders too. The result is plain weights (``ConvStack``), put in front of
an ONNX graph by ``input_alignment`` and of a module by ``torch_alignment``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bnfold.drift.denoising import NoiseFit

__all__ = ["ALPHA", "STEPS", "LearnedDenoiser", "train_denoiser"]

ALPHA = 0.5  # the recorruption's a (measured on the digits: 0.5 and 1.0 within a point)
STEPS = 1000  # measured on the digits: 2000 overfits 32 samples (95.5% -> 94.6%)
WIDTH = 16  # per net (digits, 3 draws: 8 and 12 lose a draw to a Wiener filter; 16-32 do not)
MEMBERS = 3  # nets averaged (digits, 32 samples: 2 -> 3 nets of 16 keeps the learned filter
# with a 2.3% margin, not 0.2%, in the draw where a Wiener filter came closest)
CROP = 32
PIXELS_PER_STEP = 4096
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class LearnedDenoiser:
    """``x + net(x)``: reflect-padded 3x3 convs with ReLU between (``layers``: weight [O,
    I / groups, 3, 3], bias [O]; the middle conv in ``MEMBERS`` groups), the input added back
    (``residual``)."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    noise: NoiseFit
    alpha: float
    steps: int
    loss: float  # the last 10% of steps' mean recorrupted loss, in standardized units
    residual: bool = True

    @property
    def label(self) -> str:
        return "learned"

    def to_dict(self) -> dict:
        return {
            **self.noise.to_dict(),
            "filter": "learned",
            "method": "recorrupted-to-recorrupted",
            "members": MEMBERS,
            "width": WIDTH,
            "convs": len(self.layers),
            "alpha": self.alpha,
            "steps": self.steps,
            "training_loss": self.loss,
            "macs_per_pixel": int(sum(w.size for w, _b in self.layers)),
        }


def train_denoiser(
    samples: np.ndarray, noise: NoiseFit, *, alpha: float = ALPHA, steps: int = STEPS, seed: int = 0
) -> LearnedDenoiser:
    """The denoiser for white noise of variance ``noise.sigma2`` on ``samples`` [N, C, H, W]:
    ``MEMBERS`` nets trained from seeds ``seed``, ``seed + 1``, ..., averaged."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    shift = x.mean(dim=(0, 2, 3))
    scale = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    u = (x - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)
    sigma = torch.as_tensor(np.sqrt(max(noise.sigma2, 0.0)), dtype=torch.float32) / scale
    trained = [_train(u, sigma.view(1, -1, 1, 1), alpha, steps, seed + k) for k in range(MEMBERS)]
    layers = _average([layers for layers, _loss in trained])
    m, s = shift.double().numpy(), scale.double().numpy()
    w, b = layers[0]  # net((x - m) / s): the standardization into the first conv
    layers[0] = (w / s[None, :, None, None], b - np.einsum("oikl,i->o", w, m / s))
    w, b = layers[-1]  # x + s * net(...): the scale out of the last
    layers[-1] = (w * s[:, None, None, None], b * s)
    return LearnedDenoiser(
        tuple((w.astype(np.float32), b.astype(np.float32)) for w, b in layers),
        noise,
        alpha,
        steps,
        float(np.mean([loss for _layers, loss in trained])),
    )


def _train(u, sigma, alpha: float, steps: int, seed: int) -> tuple[list, float]:
    """One net's float64 (weight, bias) per conv, and its recorrupted loss over the last 10%
    of the steps."""
    import torch
    from torch import nn

    _n, channels, height, width = u.shape
    crop = min(height, width, CROP)
    batch = max(1, min(64, PIXELS_PER_STEP // (crop * crop)))
    generator = torch.Generator().manual_seed(seed)

    def conv(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")

    losses = []
    with _one_thread(torch), torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        net = nn.Sequential(
            conv(channels, WIDTH), nn.ReLU(), conv(WIDTH, WIDTH), nn.ReLU(), conv(WIDTH, channels)
        )
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        for _ in range(steps):
            y = _draw(u, batch, crop, generator)
            z = sigma * torch.randn(y.shape, generator=generator)
            noisier, target = y + alpha * z, y - z / alpha
            loss = torch.mean((noisier + net(noisier) - target) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    layers = [(c.weight.detach().double().numpy(), c.bias.detach().double().numpy()) for c in convs]
    return layers, float(np.mean(losses[-max(1, steps // 10) :]))


@contextmanager
def _one_thread(torch) -> Iterator[None]:
    """torch on one intra-op thread, the caller's count restored after. A step is a fixed
    ``PIXELS_PER_STEP`` through three small convs, too little to share: ``train_denoiser`` at
    1000 steps took 37.2 s on one thread and 34.6 s on two alone, and two of 200 steps side by
    side on the same two cores 15 s each on one thread, 34.5 s each on two (docs/BENCHMARKS.md,
    "The suite on a slower machine, and what was cut")."""
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(caller_threads)


def _average(members: list[list]) -> list:
    """One conv stack computing the mean of the members' outputs: the first convs side by side,
    the middle ones as groups (one per member), the last ones' inputs side by side, halved."""
    if len(members) == 1:
        return members[0]
    k = len(members)
    first = (
        np.concatenate([m[0][0] for m in members]),
        np.concatenate([m[0][1] for m in members]),
    )
    middle = [
        (
            np.concatenate([m[i][0] for m in members]),  # [k * W, W, 3, 3]: groups = k
            np.concatenate([m[i][1] for m in members]),
        )
        for i in range(1, len(members[0]) - 1)
    ]
    last = (
        np.concatenate([m[-1][0] for m in members], axis=1) / k,
        np.mean([m[-1][1] for m in members], axis=0),
    )
    return [first, *middle, last]


def _draw(u, batch: int, crop: int, generator):
    """``batch`` random ``crop`` x ``crop`` crops of the standardized samples (the samples
    themselves when they are that small), flipped and transposed at random."""
    import torch

    n, _c, height, width = u.shape
    rows = torch.randint(n, (batch,), generator=generator)
    if crop == height == width:
        y = u[rows]
    else:
        tops = torch.randint(height - crop + 1, (batch,), generator=generator).tolist()
        lefts = torch.randint(width - crop + 1, (batch,), generator=generator).tolist()
        y = torch.stack(
            [
                u[i, :, top : top + crop, left : left + crop]
                for i, top, left in zip(rows.tolist(), tops, lefts, strict=True)
            ]
        )
    vertical, horizontal, transpose = (torch.rand(3, generator=generator) < 0.5).tolist()
    if vertical:
        y = y.flip(-2)
    if horizontal:
        y = y.flip(-1)
    if transpose:
        y = y.transpose(-1, -2)
    return y
