"""Models for the ONNX benchmarks: torchvision, timm and the zoo, with trained-looking BN.

Pretrained weights are not downloaded: every BN gets random non-trivial statistics instead,
which is what matters for folding (counts) and for latency (the same ops either way).
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


def build(name: str, size: int = 64) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict]:
    """(model in eval mode, example inputs, input shapes for verification by input name)."""
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
