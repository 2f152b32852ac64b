"""The model a command works on: an ONNX file, checked before use (never a pickle), or an
architecture (zoo / torchvision / timm) with safetensors weights and example inputs."""

from __future__ import annotations

from pathlib import Path

from bnfold.cli.console import BadInput, Progress

__all__ = ["architecture_model", "load_onnx", "with_external_data"]


_NOT_LOADED = (
    "bnfold does not load PyTorch checkpoints (pickles run code when loaded): export the model "
    "to ONNX (torch.onnx.export) and fold that, or save its state dict with safetensors and run "
    "`bnfold fold torchvision:NAME|timm:NAME|zoo:NAME --weights W.safetensors`"
)


def _refuse_non_onnx(path: Path) -> None:
    """Name what the file is when it is clearly not ONNX, rather than a protobuf parse error."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix in (".pt", ".pth"):
        raise BadInput(f"{path}: looks like a PyTorch checkpoint; {_NOT_LOADED}")
    if path.suffix == ".safetensors" or (len(head) == 8 and head[:1] != b"\x08" and _is_st(path)):
        raise BadInput(
            f"{path}: safetensors weights need their architecture: "
            f"`bnfold fold torchvision:NAME|timm:NAME|zoo:NAME --weights {path}`"
        )


def _is_st(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except Exception:  # noqa: BLE001 - any failure means: not safetensors
        return False


def load_onnx(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    _refuse_non_onnx(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadInput(f"{path}: not an ONNX model ({exc})") from None
    if not model.graph.output:
        raise BadInput(f"{path}: not an ONNX model (no graph outputs)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise BadInput(f"{path}: invalid ONNX model: {first}") from None
    return model


def with_external_data(model, base_dir):
    from bnfold.onnx.external_data import load_external_data

    return load_external_data(model, base_dir)


def architecture_model(args, progress: Progress):
    """The module and example inputs for ARCH, with --weights and --arch-args applied."""
    from bnfold.architectures import ArchitectureError, load_weights, parse_architecture

    try:
        architecture = parse_architecture(args.input, args.arch_args)
        progress.stage(f"building {architecture.spec}")
        model = architecture.build()
        if args.weights:
            progress.stage(f"loading weights from {args.weights}")
            model = load_weights(model, _read_weights(Path(args.weights)), architecture.spec)
        elif architecture.source != "zoo":
            progress.stage("no --weights: folding the architecture's random initialization")
    except ArchitectureError as exc:
        raise BadInput(str(exc)) from None
    except ImportError as exc:
        raise BadInput(f"{args.input}: its library is not installed ({exc.name})") from None
    shapes = list(args.input_shapes.values()) or None
    if shapes is not None and len(shapes) != len(architecture.input_shapes()):
        raise BadInput(
            f"{architecture.spec} takes {len(architecture.input_shapes())} input(s), "
            f"--input-shape gives {len(shapes)}"
        )
    batch = shapes[0][0] if shapes else 2
    inputs = architecture.example_inputs(batch=batch, shapes=shapes)
    return architecture, model, inputs


def _read_weights(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BadInput(f"--weights {path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":
            raise BadInput(f"--weights {path}: a PyTorch checkpoint; {_NOT_LOADED}") from None
        raise BadInput(f"--weights {path}: not a safetensors file ({exc})") from None
