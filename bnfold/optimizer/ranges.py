"""Data-free activation ranges: BN statistics propagated through the graph by sampling.

At every tensor with BN statistics (a folded conv's pre-activation output) the graph's
value is replaced by Gaussian samples with that channel's mean beta_c and standard deviation
|gamma_c|; onnxruntime then runs the rest of the graph on them, so every other tensor
(after ReLU, hard-swish, residual adds, pooling, SE blocks, the classifier) gets the range
the BN statistics imply, through the graph's own operators. No data goes in except the graph
inputs themselves (calibration inputs, or the example inputs when there are none).

Spatial correlation. Real feature maps are correlated across positions; i.i.d. samples would
average away under global pooling and give the classifier a range far too narrow. Each
sample is sqrt(rho) * z_nc + sqrt(1 - rho) * z_nchw: a per-(sample, channel) part constant
over positions and a per-position part, both N(0, 1).

Ranges are quantiles (not the extremes) of the sampled values, like onnxruntime's Percentile
calibration; channel means feed bias correction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.optimizer.bn_stats import ChannelStats
from bnfold.optimizer.graph import value_types
from bnfold.optimizer.timing import make_session

__all__ = ["TensorRange", "propagate_ranges"]

RHO = 0.5
_SAMPLE_CAP = 300_000  # values kept per tensor for the quantiles


@dataclass
class TensorRange:
    rmin: float
    rmax: float
    channel_mean: np.ndarray | None = None  # mean over all but axis 1 (rank >= 2)


@dataclass
class _Accumulator:
    samples: list = field(default_factory=list)
    kept: int = 0
    channel_sum: np.ndarray | None = None
    count: int = 0


def _sampling_model(
    model: onnx.ModelProto, stats: dict[str, ChannelStats], ranks: dict, rho: float
) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with BN-statistics samples in place of the stats tensors; every float value
    an output. Returns (model, the tensors replaced)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    producers = {o: n for n in g.node for o in n.output}
    replaced = []
    new_nodes = []
    for name, st in stats.items():
        node = producers.get(name)
        rank = ranks.get(name, (0, 0))[0]
        if node is None or rank < 2:
            continue
        pre = f"{name}__bnfold_pre"
        node.output[list(node.output).index(name)] = pre
        shape = [len(st.mean)] + [1] * (rank - 2)
        mean = numpy_helper.from_array(st.mean.astype(np.float32).reshape(shape), f"{name}__m")
        std = numpy_helper.from_array(st.std.astype(np.float32).reshape(shape), f"{name}__s")
        g.initializer.extend([mean, std])
        iid = f"{name}__iid"
        # seeded: the same ranges on every call (each run of the session draws afresh)
        seed = float(len(replaced) * 2 + 1)
        new_nodes.append(helper.make_node("RandomNormalLike", [pre], [iid], seed=seed))
        z = iid
        if rank >= 3 and rho > 0:
            a = numpy_helper.from_array(np.array(math.sqrt(rho), np.float32), f"{name}__a")
            b = numpy_helper.from_array(np.array(math.sqrt(1 - rho), np.float32), f"{name}__b")
            g.initializer.extend([a, b])
            new_nodes += [
                helper.make_node("GlobalAveragePool", [pre], [f"{name}__gap"]),
                helper.make_node(
                    "RandomNormalLike", [f"{name}__gap"], [f"{name}__nc"], seed=seed + 1
                ),
                helper.make_node("Mul", [f"{name}__nc", a.name], [f"{name}__nca"]),
                helper.make_node("Mul", [iid, b.name], [f"{name}__iidb"]),
                helper.make_node("Add", [f"{name}__nca", f"{name}__iidb"], [f"{name}__z"]),
            ]
            z = f"{name}__z"
        new_nodes += [
            helper.make_node("Mul", [z, std.name], [f"{name}__zs"]),
            helper.make_node("Add", [f"{name}__zs", mean.name], [name]),
        ]
        replaced.append(name)
    g.node.extend(new_nodes)
    outputs = {o.name for o in g.output}
    initializers = {t.name for t in g.initializer}
    for node in model.graph.node:  # the original graph's values, by their names
        for name in node.output:
            rank, elem = ranks.get(name, (0, 0))
            if name and name not in outputs and name not in initializers:
                if elem == TensorProto.FLOAT:
                    g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
                    outputs.add(name)
    return m, replaced


def _accumulate(acc: _Accumulator, value: np.ndarray, rng: np.random.Generator) -> None:
    flat = value.reshape(-1)
    budget = _SAMPLE_CAP - acc.kept
    if budget > 0:
        take = flat if flat.size <= budget else rng.choice(flat, budget, replace=False)
        acc.samples.append(np.asarray(take, np.float32))
        acc.kept += take.size
    if value.ndim >= 2:
        axes = tuple(i for i in range(value.ndim) if i != 1)
        s = value.astype(np.float64).sum(axis=axes)
        acc.channel_sum = s if acc.channel_sum is None else acc.channel_sum + s
        acc.count += value.size // value.shape[1]


def propagate_ranges(
    model: onnx.ModelProto,
    stats: dict[str, ChannelStats],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    repeats: int = 4,
    quantile: float = 1e-5,
    rho: float = RHO,
    threads: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, TensorRange], list[str]]:
    """Ranges of every float value of `model` (graph inputs included) and the replaced names.

    Each feed runs `repeats` times with fresh samples. `quantile` is cut from each end.
    """
    ranks = value_types(model)
    sampler, replaced = _sampling_model(model, stats, ranks, rho)
    session = make_session(sampler, threads)
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    acc: dict[str, _Accumulator] = {}
    for feed in feeds:
        for name, value in feed.items():
            _accumulate(acc.setdefault(name, _Accumulator()), np.asarray(value), rng)
        for _ in range(repeats):
            for name, value in zip(names, session.run(names, feed), strict=True):
                if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.size:
                    _accumulate(acc.setdefault(name, _Accumulator()), value, rng)
    out = {}
    for name, a in acc.items():
        values = np.concatenate(a.samples)
        lo, hi = np.quantile(values, [quantile, 1 - quantile]) if values.size > 1 else (0, 0)
        if values.min() >= 0:
            lo = 0.0  # a non-negative tensor (after ReLU) keeps zero exactly
        mean = a.channel_sum / a.count if a.channel_sum is not None else None
        out[name] = TensorRange(float(lo), float(hi), mean)
    return out, replaced
