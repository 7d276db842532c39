"""`fastattn verify`: parity of a model with fastattn swapped in, for CI.

    fastattn verify --model mypkg.gan:make_generator --input 8,128 [--input 8:int:10] \\
        [--dtype float32 ...] [--double-backward] [--json F] [--markdown F]

Exit status: 0 when every check holds, 1 when one fails (the failing checks are printed first),
2 on bad usage (unknown module or factory, a factory that raises or returns no nn.Module, a bad
--input, a model that does not run on the inputs), with a message naming what was wrong.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

from .run import DTYPE_NAMES, VerifyUsageError, verify

__all__ = ["main"]


class _Usage(Exception):
    pass


def _parse_input(text: str):
    """"2,3,64,64": a standard-normal float32 tensor of that shape; "8:int:10": integers in [0, 10)
    of shape (8,) (class labels)."""
    shape_text, _, kind = text.partition(":")
    try:
        shape = tuple(int(n) for n in shape_text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected a shape of positive integers such as 2,3,64,64 "
                                         f"(or 8:int:10 for labels in [0, 10)), got {text!r}")
    if not kind:
        return ("float", shape, None)
    kind_name, _, high = kind.partition(":")
    if kind_name != "int" or not high.isdigit() or int(high) < 1:
        raise argparse.ArgumentTypeError(f"expected SHAPE or SHAPE:int:HIGH (integers in [0, HIGH)), got {text!r}")
    return ("int", shape, int(high))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastattn verify",
        description="Swap fastattn into a copy of your model and check, layer by layer, that it "
                    "computes what the original computes: outputs and gradients against an fp64 run, "
                    "within 2x (outputs) / 3x (gradients) the original's own error in each dtype.")
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="a module (importable from here) and a function in it that returns the model, "
                             "with its checkpoint loaded if you want, e.g. mypkg.gan:make_generator")
    parser.add_argument("--input", action="append", required=True, type=_parse_input, metavar="SHAPE",
                        help="one positional input per --input: 2,3,64,64 (random normal) or 8:int:10 "
                             "(integer labels in [0, 10))")
    parser.add_argument("--dtype", action="append", choices=list(DTYPE_NAMES),
                        help="repeatable (default: float64, float32, bfloat16)")
    parser.add_argument("--device", default=None, help="move the model and inputs there (default: where "
                                                       "the factory put the model)")
    parser.add_argument("--backend", default=None, help="fastattn backend for the swapped layers (default: automatic)")
    parser.add_argument("--double-backward", action="store_true",
                        help="also check second-order gradients (R1 / gradient penalties)")
    parser.add_argument("--no-backward", action="store_true", help="check outputs only")
    parser.add_argument("--no-probe", action="store_true",
                        help="swap every structural match without swap_attention's probe")
    parser.add_argument("--no-timing", action="store_true", help="skip the time and memory measurements")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of every run (default 0)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the report as markdown")
    return parser


def _load_factory(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _Usage(f"--model must be MODULE:FACTORY, e.g. mypkg.gan:make_generator, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own modules
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise _Usage(f"--model {spec}: no module named {module_name!r} importable from "
                         f"{os.getcwd()} (is it installed, or run from its parent folder?)") from None
        raise _Usage(f"--model {spec}: importing {module_name!r} failed: {error}") from None
    except Exception as error:  # noqa: BLE001 - the user's module raised on import
        raise _Usage(f"--model {spec}: importing {module_name!r} raised {type(error).__name__}: {error}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise _Usage(f"--model {spec}: module {module_name!r} has no {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise _Usage(f"--model {spec}: {attr!r} is a {type(factory).__name__}, not a function returning the model")
    return factory


def _make_inputs(specs, seed: int, device) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for kind, shape, high in specs:
        t = torch.randn(shape, generator=gen) if kind == "float" else torch.randint(0, high, shape, generator=gen)
        inputs.append(t.to(device))
    return tuple(inputs)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed what was wrong
        return int(exit_.code or 0)
    try:
        factory = _load_factory(args.model)
        try:
            model = factory()
        except Exception as error:  # noqa: BLE001 - the user's factory
            raise _Usage(f"--model {args.model}: calling the factory raised {type(error).__name__}: {error}") from None
        if not isinstance(model, torch.nn.Module):
            raise _Usage(f"--model {args.model}: the factory returned a {type(model).__name__}, "
                         "expected a torch.nn.Module")
        if args.device:
            try:
                model = model.to(args.device)
            except Exception as error:  # noqa: BLE001
                raise _Usage(f"--device {args.device}: {type(error).__name__}: {error}") from None
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
        report = verify(model, _make_inputs(args.input, args.seed, device), dtypes=args.dtype or
                        ("float64", "float32", "bfloat16"), backward=not args.no_backward,
                        double_backward=args.double_backward, backend=args.backend,
                        probe=not args.no_probe, timing=not args.no_timing, seed=args.seed)
    except (_Usage, VerifyUsageError) as error:
        print(f"fastattn verify: {error}", file=sys.stderr)
        return 2
    if not report.ok:
        print("\n".join(report.failures) + "\n")
    print(report.to_text(failures=False))
    for path, text in ((args.json, report.to_json), (args.markdown, report.to_markdown)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text() + ("\n" if path == args.json else ""))
    return 0 if report.ok else 1
