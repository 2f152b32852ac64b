"""What every fold pattern shares: outcomes, and copy-on-write replacement of a layer.

A fold never edits a weight in place. The folded layer is a new module with new tensors; the
graph node is repointed to it. If the old module is called from other nodes too (a reused
module), it stays for them under its name and the folded copy gets a new one, so every other
call computes exactly what it did before. Tied weights are untied the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import Tensor, fx, nn

from bnfold.capture import fetch_attr, free_name

__all__ = ["FoldContext", "Folded", "Rejected", "conv_is_transposed", "describe"]


@dataclass
class Folded:
    targets: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Rejected:
    reason: str


def describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "placeholder":
        return f"model input '{node.target}'"
    if node.op == "get_attr":
        return f"constant '{node.target}'"
    return f"{node.op} '{getattr(node.target, '__name__', node.target)}'"


@dataclass
class FoldContext:
    gm: fx.GraphModule
    constants: dict = field(default_factory=dict)  # memo of capture.constant_value

    def add_constant(self, value: Tensor, replaces: fx.Node) -> str:
        """Store `value` as a buffer of the graph module and use it in place of `replaces`."""
        i = 0
        while hasattr(self.gm, f"_bnfold_const{i}"):
            i += 1
        name = f"_bnfold_const{i}"
        self.gm.register_buffer(name, value.detach().clone())
        with self.gm.graph.inserting_before(replaces):
            const = self.gm.graph.get_attr(name)
        replaces.replace_all_uses_with(const)
        self.gm.graph.erase_node(replaces)
        return name

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return fetch_attr(self.gm, str(node.target))

    def _call_sites(self, target: str) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == target)

    owners: dict[int, list[tuple[str, nn.Module]]] | None = None

    def tied_with(self, module: nn.Module) -> list[str]:
        """Names of other modules holding one of `module`'s parameter tensors."""
        if self.owners is None:  # ties are between the model's own modules: map them once
            self.owners = {}
            for name, m in self.gm.named_modules(remove_duplicate=False):
                for p in m.parameters(recurse=False):
                    self.owners.setdefault(id(p), []).append((name, m))
        names = []
        for p in module.parameters(recurse=False):
            names += [n for n, m in self.owners.get(id(p), []) if m is not module]
        return sorted(set(names))

    def replace_layer(self, node: fx.Node, weight: Tensor, bias: Tensor) -> tuple[str, list[str]]:
        """Point `node` at a copy of its module with new weight and bias.

        Returns the copy's name and notes (reuse, ties) for the report.
        """
        old_target = str(node.target)
        old = fetch_attr(self.gm, old_target)
        new = copy.deepcopy(old)
        requires_grad = old.weight.requires_grad
        new.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
        notes = []
        tied = self.tied_with(old)
        if tied:
            notes.append(
                f"'{old_target}' shared weights with {', '.join(tied)}; "
                "the folded layer got its own copy, the others are unchanged"
            )
        if self._call_sites(old_target) == 1:
            parent_name, _, leaf = old_target.rpartition(".")
            parent = fetch_attr(self.gm, parent_name) if parent_name else self.gm
            setattr(parent, leaf, new)
            return old_target, notes
        # reused module: the other call sites keep the original
        candidate = free_name(self.gm, f"{old_target}_bnfold")
        self.gm.add_submodule(candidate, new)
        node.target = candidate
        notes.append(
            f"'{old_target}' is called {self._call_sites(old_target) + 1} times; this call "
            f"now uses the folded copy '{candidate}', the other calls keep the original"
        )
        return candidate, notes

    def remove_bn(self, bn: fx.Node, replacement: fx.Node) -> None:
        bn.replace_all_uses_with(replacement)
        self.gm.graph.erase_node(bn)


def conv_is_transposed(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvTransposeNd)
