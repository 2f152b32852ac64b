"""Small graphs and models for the optimize tests."""

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU, depthwise Conv-BN-ReLU6, residual add, pooled Linear: 10 classes."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
            )
            self.dw = nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
            )
            self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            y = self.stem(x)
            y = torch.relu(y + self.pw(self.dw(y)))
            return self.head(y.mean((2, 3)))

    net = Net()
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return net.eval()


def conv_act_conv(act: str = "Relu", depthwise: bool = False, seed: int = 0):
    """x -> Conv(3x3, bias) -> act -> Conv (dense 1x1 or depthwise 3x3) -> y, opset 17."""
    rng = np.random.default_rng(seed)
    c = 6
    w1 = (rng.standard_normal((c, 3, 3, 3)) * rng.uniform(0.05, 3, (c, 1, 1, 1))).astype(np.float32)
    b1 = rng.standard_normal(c).astype(np.float32)
    w2 = (rng.standard_normal((c, 1, 3, 3) if depthwise else (4, c, 1, 1))).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    if act == "Clip":
        inits += [
            numpy_helper.from_array(np.array(v, np.float32), n)
            for v, n in ((0.0, "lo"), (6.0, "hi"))
        ]
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act"))
    else:
        nodes.append(helper.make_node(act, ["h"], ["a"], name="act"))
    attrs = {"group": c, "pads": [1, 1, 1, 1]} if depthwise else {}
    nodes.append(helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", **attrs))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
