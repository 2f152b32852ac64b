"""``bnfold fold``: fold BatchNorm in an ONNX file, or in an architecture's weights in torch and
export the result; verify against the original when asked."""

from __future__ import annotations

import json
from pathlib import Path

from bnfold.cli.console import (
    ARCHITECTURE_PREFIXES,
    EXIT_OK,
    EXIT_VERIFY_FAILED,
    BadInput,
    Progress,
    check_writable,
    parse_shapes,
)
from bnfold.cli.loading import architecture_model, load_onnx, with_external_data

__all__ = ["add_fold"]


def _fold_onnx_file(args, progress: Progress, out: dict) -> int:
    import onnx

    from bnfold.onnx.external_data import ExternalDataError
    from bnfold.onnx.fold import fold_onnx
    from bnfold.onnx.ir_version import lower_for_runtime
    from bnfold.onnx.verify import verify_onnx

    progress.stage(f"loading {args.input}")
    model = load_onnx(Path(args.input))
    try:
        model, note = lower_for_runtime(model)
    except ValueError as exc:
        if args.verify:
            raise BadInput(f"{args.input}: {exc}: it cannot be verified") from None
        note = f"{exc}: the folded graph keeps the IR version, and onnxruntime cannot run it"
    if note:
        print(f"note: {note}")
        out["notes"] = [note]
    progress.stage(f"folding BatchNormalization ({len(model.graph.node)} nodes)")
    try:
        result = fold_onnx(model, base_dir=args.base_dir)
    except ExternalDataError as exc:
        raise BadInput(str(exc)) from None
    print(result.report.summary())
    print(f"nodes: {result.nodes_before} before, {result.nodes_after} after")
    out["fold"] = result.to_dict()
    if args.output:
        progress.stage(f"writing {args.output}")
        onnx.save(result.model, args.output)
    if not args.verify:
        return EXIT_OK
    original = model if args.base_dir is None else with_external_data(model, args.base_dir)
    progress.stage("verifying in onnxruntime")
    try:
        check = verify_onnx(
            original,
            result.model,
            input_shapes=args.input_shapes,
            progress=progress.cases("verify"),
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    print(check.summary())
    out["verify_onnx"] = check.to_dict()
    return EXIT_OK if check.ok else EXIT_VERIFY_FAILED


def _fold_architecture(args, progress: Progress, out: dict) -> int:
    import bnfold

    architecture, model, inputs = architecture_model(args, progress)
    progress.stage("folding BatchNorm (torch)")
    result = bnfold.fold(model, inputs)
    print(result.report.summary())
    out["fold"] = {"report": result.report.to_dict()}
    progress.stage("verifying (torch)")
    check = bnfold.verify(model, result.module, inputs)
    print(check.summary())
    out["verify"] = check.to_dict()
    status = EXIT_OK if check.ok else EXIT_VERIFY_FAILED
    if not args.output:
        return status
    from bnfold.onnx.export import ExportMismatch, export_onnx
    from bnfold.onnx.fold import count_nodes
    from bnfold.onnx.verify import verify_onnx

    def export(module, what: str, path: str | None = None):
        """The checked export, or None when it computes something else (nothing written)."""
        try:
            return export_onnx(module, inputs, path=path)
        except ExportMismatch as exc:
            print(f"ONNX export of {what} failed its check: {exc}")
            out.setdefault("onnx", {})["error"] = str(exc)
            return None

    progress.stage(f"exporting the folded model to {args.output}")
    folded = export(result.module, "the folded model", args.output)
    if folded is None:
        return EXIT_VERIFY_FAILED
    bn_left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    print(f"ONNX: {count_nodes(folded)} nodes, {bn_left} BatchNormalization")
    out["onnx"] = {"nodes": count_nodes(folded), "batch_norm_nodes": bn_left}
    if args.verify:
        progress.stage("exporting the original for comparison")
        original = export(model, "the original")
        if original is None:
            return EXIT_VERIFY_FAILED
        out["onnx"]["nodes_original"] = count_nodes(original)
        # the inputs' own shapes; the exported graph leaves spatial dims symbolic
        shapes = {v.name: list(x.shape) for v, x in zip(original.graph.input, inputs, strict=False)}
        progress.stage("verifying the exported graphs in onnxruntime")
        try:
            onnx_check = verify_onnx(
                original, folded, input_shapes=shapes, progress=progress.cases("verify")
            )
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        print("ONNX " + onnx_check.summary())
        out["verify_onnx"] = onnx_check.to_dict()
        if not onnx_check.ok:
            status = EXIT_VERIFY_FAILED
    return status


def _cmd_fold(args) -> int:
    args.input_shapes = parse_shapes(args.input_shape)
    check_writable("-o", args.output)
    check_writable("--report", args.report)
    progress = Progress()
    out: dict = {"input": args.input}
    if args.input.startswith(ARCHITECTURE_PREFIXES):
        status = _fold_architecture(args, progress, out)
    else:
        for flag in ("weights", "arch_args"):
            if getattr(args, flag):
                raise BadInput(
                    f"--{flag.replace('_', '-')} goes with an architecture "
                    "(zoo:NAME, torchvision:NAME, timm:NAME), not with an ONNX file"
                )
        status = _fold_onnx_file(args, progress, out)
    if args.report:
        Path(args.report).write_text(json.dumps(out, indent=2) + "\n")
        progress.stage(f"report written to {args.report}")
    return status


def add_fold(sub) -> None:
    fold = sub.add_parser(
        "fold",
        help="fold BatchNorm in an ONNX file or an architecture's weights",
        description="Fold BatchNorm in an ONNX file, or in a zoo / torchvision / timm "
        "architecture with safetensors weights (folded in torch, exported to ONNX).",
    )
    fold.add_argument(
        "input",
        metavar="IN",
        help="an .onnx file, or zoo:NAME, torchvision:NAME, timm:NAME (PyTorch checkpoints, "
        "which are pickles, are not loaded)",
    )
    fold.add_argument(
        "--weights",
        metavar="W.safetensors",
        help="the architecture's weights (default: the zoo's own; torchvision/timm: random)",
    )
    fold.add_argument(
        "--arch-args",
        metavar="JSON",
        help="constructor arguments, e.g. '{\"num_classes\": 10}' (num_classes, in_chans, "
        "global_pool, drop_rate, width_mult, aux_logits)",
    )
    fold.add_argument("-o", "--output", metavar="OUT.onnx", help="write the folded ONNX graph")
    fold.add_argument("--report", metavar="REPORT.json", help="write the reports as JSON")
    fold.add_argument("--verify", action="store_true", help="compare with the original")
    fold.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="shape of a graph input with symbolic dims, for generated verification inputs",
    )
    fold.add_argument(
        "--base-dir",
        metavar="DIR",
        help="directory allowed for the model's external data files (only this one is read)",
    )
    fold.set_defaults(func=_cmd_fold)
