"""BN statistics of a graph, by the name of each BatchNormalization's output tensor.

Read from the graph *before* folding: BN output channel c has mean beta_c and standard
deviation |gamma_c| on the training distribution (`bnfold.optimizer.dfq`). ``fold_onnx`` hands
a BN output's name to the node it folds into, so after a backward fold the same name is the
folded conv's output, the pre-activation tensor whose statistics these are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.optimizer.graph import constants as graph_constants

__all__ = ["ChannelStats", "consistency", "read_bn_stats"]


@dataclass
class ChannelStats:
    mean: np.ndarray  # [C]
    std: np.ndarray  # [C], >= 0

    def scaled(self, s: np.ndarray) -> ChannelStats:
        """The statistics of x / s per channel (s > 0)."""
        return ChannelStats(self.mean / s, self.std / s)


def read_bn_stats(model: onnx.ModelProto) -> tuple[dict[str, ChannelStats], list[str]]:
    """(stats by BN output name, notes on BNs whose statistics could not be read)."""
    constants = graph_constants(model.graph)
    stats: dict[str, ChannelStats] = {}
    notes: list[str] = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        training = any(a.name == "training_mode" and a.i for a in node.attribute)
        gamma, beta = constants.get(node.input[1]), constants.get(node.input[2])
        if training or gamma is None or beta is None:
            notes.append(f"{node.name or node.output[0]}: BN in training mode or not constant")
            continue
        stats[node.output[0]] = ChannelStats(
            np.asarray(beta, np.float64).reshape(-1), np.abs(np.asarray(gamma, np.float64))
        )
    return stats, notes


def consistency(
    model: onnx.ModelProto, stats: dict[str, ChannelStats], feed: dict[str, np.ndarray]
) -> dict | None:
    """How well the statistics describe `model`'s activations on `feed`: per BN tensor, the
    median over channels of observed std / |gamma|; the median, min and max over tensors.

    About 1 after training; far from 1 (random weights with made-up statistics), ranges
    derived from the statistics are not the activations' ranges.
    """
    from bnfold.optimizer.timing import make_session

    produced = {o for n in model.graph.node for o in n.output}
    names = [n for n in stats if n in produced]
    if not names:
        return None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    ratios = []
    for name, value in zip(names, make_session(m).run(names, feed), strict=True):
        if value.ndim < 2 or value.size // value.shape[1] < 2:
            continue
        std = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1).std(axis=1)
        live = stats[name].std > 1e-12
        if live.any():
            ratios.append(float(np.median(std[live] / stats[name].std[live])))
    if not ratios:
        return None
    return {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}
