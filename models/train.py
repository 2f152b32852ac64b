"""``python -m models.train [NAME ...]``: rerun the zoo's training and ship its weights.

Trains each named zoo model or digits model (``models.digits.ARCHITECTURES``; all of them by
default) from scratch, writes its weights and the run's record to
``models/weights/NAME.safetensors``, and, when a default model of the service was retrained,
re-exports the service's shipped graphs (``service/default_graphs.py``) so that
they keep computing what ``models.build`` computes. Commit what it wrote: every machine then
builds these exact weights. ``--check`` trains and compares without writing anything.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from models import digits, registry, shipped


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__)
    parser.add_argument("names", nargs="*", help="zoo models (default: all)")
    parser.add_argument(
        "--check", action="store_true", help="train and score against the shipped weights only"
    )
    args = parser.parse_args(argv)
    known = [*registry.names(), *digits.ARCHITECTURES]
    names = args.names or known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown zoo models {unknown}; known: {', '.join(known)}")

    for name in names:
        if name in digits.ARCHITECTURES:
            model, log = digits.train(name=name)
            line = f"{name}: loss {log.first_loss:.4f} -> {log.last_loss:.4f}, test accuracy "
            line += f"{log.test_accuracy:.4f}"
            if args.check:
                split = digits.load_split()
                shipped_accuracy = digits.accuracy(digits.build(name), split.test_x, split.test_y)
                print(f"{line}; shipped weights {shipped_accuracy:.4f}")
                continue
        else:
            model, log = registry.train(name)
            line = (
                f"{name}: loss {log.first_loss:.4f} -> {log.last_loss:.4f}, "
                f"eval-mode fit {log.fit_loss:.4f}"
            )
            if args.check:
                shipped_loss = registry.fit_score(name, registry.build(name))
                print(f"{line}; shipped weights {shipped_loss:.4f}")
                continue
        record = {
            **log.to_dict(),
            "cpu": _cpu_name(),
            "torch": torch.__version__,
        }
        print(f"{line} -> {shipped.save(name, model, record)}")
    registry.clear_cache()

    if not args.check and set(names) & set(registry.DEFAULT_MODELS):
        # a maintenance step, not a library dependency: the zoo never imports the service
        from service.default_graphs import write_graphs

        for path in write_graphs():
            print(f"re-exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
