"""Models for the ONNX benchmarks: torchvision, timm and the zoo, with trained-looking BN.

Pretrained weights are not downloaded: every BN gets random non-trivial statistics instead,
which is what matters for folding (counts) and for latency (the same ops either way).
For accuracy they are too random: `measured_bn` gives statistics that describe the activations.
"""

from __future__ import annotations

import torch
from torch import nn

TORCHVISION = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "regnet_y_400mf",
]
TIMM = [
    "resnet26d",
    "mobilenetv3_small_100",
    "regnetx_002",
    "dla34",
    "rexnet_100",
    "tf_efficientnet_b0",
]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.running_mean.numel()
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return model.eval()


def measured_bn(
    model: nn.Module, seed: int = 0, size: int = 224, batches: int = 4, batch: int = 16
) -> nn.Module:
    """Random gamma and beta as `randomize_bn` draws them, and running statistics *measured*:
    the population estimate (cumulative mean of batch statistics, torch's ``momentum=None``)
    over `batches` batches of N(0, 1) inputs, as training would leave them on that input.

    `randomize_bn`'s statistics do not describe the activations they normalize, so a deep
    network's signal can vanish: with them torchvision's MobileNetV2 gives the same logits
    for every input (docs/BENCHMARKS.md, issue 13), and accuracy on generated inputs then
    measures rounding of a constant. Here each BN normalizes what it sees, as in a trained
    network, and the output depends on the input.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    momenta = [m.momentum for m in bns]
    for m in bns:
        n = m.num_features
        with torch.no_grad():
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, size, size, generator=gen))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


class _LinearOverSequence(nn.Module):
    """A Linear on [N, L, F], its features moved to dim 1 for BatchNorm1d (a 1-D conv stem's
    or a sequence model's way)."""

    def __init__(self, f_in: int = 16, f_out: int = 24):
        super().__init__()
        self.linear, self.bn = nn.Linear(f_in, f_out), nn.BatchNorm1d(f_out)

    def forward(self, x):
        return torch.relu(self.bn(self.linear(x).transpose(1, 2)))


def _bn_before_padded_conv(mode: str) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, padding_mode=mode)
    )


# placements the exporter writes with a node between the BN and the layer it folds into
PLACEMENTS = {
    "linear_transpose_bn": (_LinearOverSequence, (2, 10, 16)),
    "bn_flatten_linear": (
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 10)),
        (2, 8, 6, 6),
    ),
    "bn_reflect_conv": (lambda: _bn_before_padded_conv("reflect"), (2, 8, 12, 12)),
    "bn_replicate_conv": (lambda: _bn_before_padded_conv("replicate"), (2, 8, 12, 12)),
    "bn_circular_conv": (lambda: _bn_before_padded_conv("circular"), (2, 8, 12, 12)),
}


def build(name: str, size: int = 64) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict]:
    """(model in eval mode, example inputs, input shapes for verification by input name)."""
    if name.startswith("placement:"):
        make, shape = PLACEMENTS[name[10:]]
        torch.manual_seed(0)
        return randomize_bn(make()), (torch.randn(*shape),), {"shapes": [[1, *shape[1:]]]}
    if name.startswith("zoo:"):
        import models

        zoo = name[4:]
        model = models.build(zoo)
        inputs = models.example_inputs(zoo, batch=2)
        return model, inputs, {"shapes": [list(s) for s in models.input_shapes(zoo)]}
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False, num_classes=100)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=100)
    x = torch.randn(2, 3, size, size)
    return randomize_bn(model), (x,), {"shapes": [[1, 3, size, size]]}


def all_names(include_zoo: bool = True) -> list[str]:
    names = list(TORCHVISION) + [f"timm:{n}" for n in TIMM]
    if include_zoo:
        import models

        names += [f"zoo:{n}" for n in models.names()]
    return names
