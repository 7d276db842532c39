"""`fastattn` command line: `info`, `bench`, `train`, `verify`. Subcommands import their code lazily."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "info": ("fastattn.cli", "list the backends, whether each can run here, and why not"),
    "bench": ("fastattn.bench", "benchmark fastattn against the naive path and SDPA on GAN shapes"),
    "train": ("fastattn.models.train", "train the reference attention GAN"),
    "verify": ("fastattn.verification.cli", "check that a model with fastattn swapped in still computes what it did"),
}


def info_main(argv: list[str]) -> int:
    import torch

    from .version import __version__
    from .dispatch import ENV_VAR, backend_report

    argparse.ArgumentParser(prog="fastattn info", description=SUBCOMMANDS["info"][1]).parse_args(argv)
    print(f"fastattn {__version__}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as error:
        print(f"triton not importable ({type(error).__name__}: {error})")
    print(f"{'backend':<10}{'priority':>9}  status")
    for row in backend_report():
        status = "available" if row["available"] else "unavailable: " + "; ".join(row["reasons"])
        print(f"{row['name']:<10}{row['priority']:>9}  {status}")
    print(f"Automatic choice takes the highest-priority backend that accepts the input; "
          f"{ENV_VAR}=<name> or backend=<name> forces one.")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = "\n".join(f"  {name:<7}{help_}" for name, (_, help_) in SUBCOMMANDS.items())
        print(f"usage: fastattn <command> [options]\n\ncommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nfastattn: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    if name == "info":
        return info_main(rest)
    return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)
