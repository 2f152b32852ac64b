"""Model -> torch.fx graph, with the facts the fold patterns need about each node.

Capture is symbolic tracing with a tracer that keeps BatchNorm and affine layers as leaves
(`call_module` nodes we can read weights from), and then shape propagation over the caller's
example inputs, so that every decision about an axis is proven from real shapes rather than
from module types. BatchNorm also shows up as a function (`F.batch_norm`, `torch.batch_norm`)
when a subclass such as timm's BatchNormAct2d re-implements `forward`; those call sites are
read from their arguments.
"""

from __future__ import annotations

import inspect
import logging
import operator
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

log = logging.getLogger(__name__)

__all__ = [
    "AFFINE_TYPES",
    "BNSite",
    "CaptureError",
    "bn_arguments",
    "bn_site",
    "constant_value",
    "expose_inplace_writes",
    "is_constant",
    "fetch_attr",
    "free_name",
    "is_inplace",
    "is_shape_only",
    "node_shape",
    "trace",
]

AFFINE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)

# F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
_F_BN_SIG = inspect.signature(F.batch_norm)
# torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
_TORCH_BN_PARAMS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)

_STOCK_FORWARDS = {
    nn.modules.batchnorm._BatchNorm.forward,
    nn.SyncBatchNorm.forward,
    nn.Linear.forward,
    nn.Conv1d.forward,
    nn.Conv2d.forward,
    nn.Conv3d.forward,
    nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward,
}


class CaptureError(RuntimeError):
    """The model could not be turned into one graph (data-dependent control flow, ...)."""


def is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d and look-alikes: BN statistics held as buffers, no
    parameters, forward computes x * w/sqrt(rv+eps) + (b - rm * w/sqrt(rv+eps))."""
    return (
        "FrozenBatchNorm" in type(m).__name__
        and all(isinstance(getattr(m, k, None), Tensor) for k in ("weight", "bias"))
        and all(isinstance(getattr(m, k, None), Tensor) for k in ("running_mean", "running_var"))
        and isinstance(getattr(m, "eps", None), float)
    )


def _has_stock_forward(m: nn.Module) -> bool:
    return type(m).forward in _STOCK_FORWARDS


class _FoldTracer(fx.Tracer):
    """Keeps stock BN / Conv / Linear (and subclasses that do not override forward) as leaves,
    plus whatever timm marks as not traceable."""

    def __init__(self) -> None:
        autowrap: tuple = ()
        self._extra_leaves: tuple[type, ...] = ()
        # timm registers modules and functions that symbolic tracing cannot go through. A timm
        # model means timm is imported already; importing it ourselves would cost seconds.
        timm_fx = sys.modules.get("timm.layers._fx")
        if timm_fx is not None:
            self._extra_leaves = tuple(timm_fx.get_notrace_modules())
            autowrap = tuple(timm_fx.get_notrace_functions())
        super().__init__(autowrap_functions=tuple(f for f in autowrap if callable(f)))

    def trace(self, root, concrete_args=None):
        self._tensor_names: dict[bool, dict[int, str]] | None = None
        return super().trace(root, concrete_args)

    def _tensor_name(self, value: Tensor, buffers: bool) -> str | None:
        """The model's name for a parameter (or buffer) tensor, through dicts built once:
        fx scans every parameter / buffer of the model for each lookup, which is quadratic
        in model size (seconds on a MobileOne)."""
        if self._tensor_names is None:
            root = self.root
            self._tensor_names = {
                True: {id(p): n for n, p in reversed(list(root.named_parameters()))},
                False: {id(b): n for n, b in reversed(list(root.named_buffers()))},
            }
        if isinstance(value, nn.Parameter):
            return self._tensor_names[True].get(id(value))
        return self._tensor_names[False].get(id(value)) if buffers else None

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
            name = self._tensor_name(a, buffers=True)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if not isinstance(attr_val, Tensor):
            return attr_val
        name = self._tensor_name(attr_val, buffers=self.proxy_buffer_attributes)
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Linear | nn.modules.conv._ConvNd):
            # a subclass with its own forward (timm's BatchNormAct2d adds an activation) is
            # traced through, so the BN inside it shows up as F.batch_norm
            return _has_stock_forward(m)
        if is_frozen_bn(m) or isinstance(m, self._extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """Trace `model` (in eval mode) and annotate every node with its output shape."""
    try:
        tracer = _FoldTracer()
        graph = tracer.trace(model)
        name = model.__class__.__name__
        gm = fx.GraphModule(tracer.root, graph, name)
        expose_inplace_writes(gm.graph)
        gm.recompile()
    except Exception as exc:  # tracing raises many kinds; all mean "not capturable"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CaptureError(f"{type(exc).__name__}: {first_line}") from exc
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise CaptureError(f"shape propagation failed: {type(exc).__name__}: {exc}") from exc
    return gm


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def free_name(gm: fx.GraphModule, base: str) -> str:
    """`base`, or `base`1, `base`2, ...: the first name no attribute of `gm` has yet."""
    name, i = base, 0
    while True:
        try:
            fetch_attr(gm, name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}{i}"


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The output shape recorded by shape propagation, or None (not a single tensor)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.setitem,
}


def is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node may write into one of its inputs (so reading that input after it
    would see the new values)."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (
            name.endswith("_") and not name.startswith("_")
        )
    if node.op == "call_method":
        return str(node.target).endswith("_") or node.kwargs.get("inplace", False) is True
    if node.op == "call_module":
        return bool(getattr(fetch_attr(gm, str(node.target)), "inplace", False))
    return False


def _returns_written_input(node: fx.Node) -> bool:
    """In-place ops that return the tensor they write: Tensor methods (`x.add_(y)`) and the
    augmented assignments (`x += y`). Not setitem, which returns None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    return node.op == "call_function" and node.target in _INPLACE_OPERATORS - {operator.setitem}


def expose_inplace_writes(graph: fx.Graph) -> None:
    """Make in-place writes visible as data flow: after `out.add_(y)`, whose result the model
    may drop, every later reader of `out` reads the add node instead. Both are the same tensor,
    so nothing computes differently; but a later reader now depends on the write, and a pass
    that replaces the write (a branch merge) replaces what that reader sees."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not _returns_written_input(node):
            continue
        written = node.args[0]
        for user in list(written.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(written, node)


_SHAPE_METHODS = {"size", "dim", "ndimension", "numel"}


def is_shape_only(node: fx.Node) -> bool:
    """Whether the node reads only the shape of its input (x.size(0), x.shape, x.dim()): a
    BN preserves shapes, so such a user does not care whether the BN is there."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    return False


_NOT_CONSTANT = object()


def constant_value(node: Any, gm: fx.GraphModule, memo: dict) -> Any:
    """The value of `node` if it depends on no model input (only on parameters, buffers and
    literals), computed here; else the marker _NOT_CONSTANT. Modules are never called, and
    ops that may write in place are not evaluated."""
    if not isinstance(node, fx.Node):
        if isinstance(node, list | tuple):
            values = [constant_value(a, gm, memo) for a in node]
            return _NOT_CONSTANT if any(v is _NOT_CONSTANT for v in values) else type(node)(values)
        return node
    if node in memo:
        return memo[node]
    value = _NOT_CONSTANT
    if node.op == "get_attr":
        value = fetch_attr(gm, str(node.target))
    elif node.op in ("call_function", "call_method") and not is_inplace(node, gm):
        args = constant_value(tuple(node.args), gm, memo)
        kwargs = {k: constant_value(v, gm, memo) for k, v in node.kwargs.items()}
        if args is not _NOT_CONSTANT and all(v is not _NOT_CONSTANT for v in kwargs.values()):
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                else:
                    value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
    memo[node] = value
    return value


def is_constant(value: Any) -> bool:
    return value is not _NOT_CONSTANT


@dataclass
class BNSite:
    """One BatchNorm call site, as eval mode computes it: y = s * x + t per channel of dim 1."""

    node: fx.Node
    kind: str
    input: fx.Node
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    uses_batch_stats: str | None  # why this call normalizes with batch statistics, if it does
    constant_args: str | None  # why the statistics are not graph constants, if they are not

    @property
    def foldable_reason(self) -> str | None:
        """None when eval mode computes a fixed affine map, else the reason it does not."""
        return self.uses_batch_stats or self.constant_args


def _const(gm: fx.GraphModule, arg: Any) -> tuple[Tensor | None, bool]:
    """(tensor, is_constant) for a BN argument: a get_attr node or None is constant."""
    if arg is None:
        return None, True
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch_attr(gm, str(arg.target))
        return (value, True) if isinstance(value, Tensor) else (None, False)
    return None, False


def _module_site(node: fx.Node, gm: fx.GraphModule) -> BNSite | None:
    m = fetch_attr(gm, str(node.target))
    if is_frozen_bn(m):
        return BNSite(
            node, type(m).__name__, node.args[0], m.running_mean, m.running_var,
            m.weight, m.bias, float(m.eps), None, None,
        )  # fmt: skip
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not _has_stock_forward(m):
        return None
    batch_stats = None
    if m.training:
        batch_stats = "module is in training mode"
    elif m.running_mean is None or m.running_var is None:
        batch_stats = (
            "track_running_stats=False: it normalizes with batch statistics even in eval mode"
        )
    return BNSite(
        node, type(m).__name__, node.args[0], m.running_mean, m.running_var,
        m.weight, m.bias, float(m.eps), batch_stats, None,
    )  # fmt: skip


def bn_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a functional batch_norm call by name (input, running_mean,
    running_var, weight, bias, training, momentum, eps)."""
    if node.target is F.batch_norm:
        bound = _F_BN_SIG.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    a = dict(zip(_TORCH_BN_PARAMS, node.args, strict=False)) | dict(node.kwargs)
    a.pop("cudnn_enabled", None)
    return a


def _function_site(node: fx.Node, gm: fx.GraphModule) -> BNSite | None:
    if node.target is F.batch_norm:
        kind = "F.batch_norm"
    elif node.target is torch.batch_norm:
        kind = "torch.batch_norm"
    else:
        return None
    a = bn_arguments(node)
    tensors = {}
    not_constant = []
    for key in ("running_mean", "running_var", "weight", "bias"):
        tensors[key], is_const = _const(gm, a.get(key))
        if not is_const:
            not_constant.append(key)
    batch_stats = None
    training = a.get("training", False)
    if training is not False:
        batch_stats = "called with training=True: it normalizes with batch statistics"
    elif tensors["running_mean"] is None or tensors["running_var"] is None:
        if not not_constant:
            batch_stats = "called without running statistics: it uses batch statistics"
    eps = a.get("eps", 1e-5)
    const_reason = None
    if not_constant:
        const_reason = f"{', '.join(not_constant)} computed in the graph, not constants"
    elif not isinstance(eps, float | int):
        const_reason = "eps is computed in the graph"
    return BNSite(
        node, kind, a["input"], tensors["running_mean"], tensors["running_var"],
        tensors["weight"], tensors["bias"], float(eps) if isinstance(eps, float | int) else 0.0,
        batch_stats, const_reason,
    )  # fmt: skip


def bn_site(node: fx.Node, gm: fx.GraphModule) -> BNSite | None:
    """The BN call site at `node`, or None if the node is not a BatchNorm."""
    if node.op == "call_module":
        return _module_site(node, gm)
    if node.op == "call_function":
        return _function_site(node, gm)
    return None
