"""`fastattn train`: train the reference attention GAN (fastattn.models) end to end.

    fastattn train --out runs/shapes                       # generated shapes, 32x32, a few minutes on CPU
    fastattn train --out runs/mine --data ~/pictures --resolution 64 --steps 20000 --device cuda
    fastattn train --out runs/shapes --resume --steps 3000  # continue a run exactly where it stopped

Writes into --out: log.jsonl (one JSON object per step; a NaN or infinite number is the string
"NaN", "Infinity" or "-Infinity"), checkpoint.pt (resumable: models, optimizers, RNG states, step;
plain data with a sha256, see fastattn.models.checkpoint) and checkpoint.prev.pt (the one before),
samples/step_XXXXXX.png grids at intervals and at the end, samples.png (the latest grid),
losses.png, config.json and, at the end, summary.json. Each file is written atomically, and .lock
keeps a second run out of the folder while this one runs (fastattn.models.files).

"Shows learning" is measured by FD8, the Frechet distance between 8x8-pooled samples and the
data (fastattn.models.metrics): it is logged at every sample interval and summary.json reports
it before and after training, next to its floor (the data against another draw of itself).
The default run (500 steps, 32x32 shapes) takes FD8 from 104 to 11.4 (floor 1.4): x0.11, with
the same numbers on 1 or 2 threads; 3 CPU-minutes (0.66 s/step on one core of the 2-core dev
machine while other jobs shared it; use --threads 1 on a busy machine).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..argtypes import number_type
from .checkpoint import CheckpointError, load_checkpoint, previous_checkpoint, save_checkpoint
from .data import folder_dataset, shapes_dataset
from .files import (RunFileError, RunLockedError, atomic_write_text, json_line, json_safe, read_jsonl,
                    remove_stale_tmp, run_lock)
from .gan import Discriminator, Generator
from .trainer import GANTrainer
from .metrics import fd8, frechet_distance, pooled_features
from .pictures import plot_losses, save_grid

__all__ = ["main", "build_parser", "DEFAULTS"]

# Settings that define a run. Defaults are the out-of-box run: 32x32 generated shapes that show
# learning in a few minutes on 2 CPU cores (see summary.json of a default run).
DEFAULTS = {
    "resolution": 32, "ch": 16, "z_dim": 64, "g_attn_res": 16, "d_attn_res": 16, "attn_pool": False,
    "spectral_norm": True, "conditional": True, "batch_size": 32, "lr_g": 1e-4, "lr_d": 4e-4,
    "beta1": 0.0, "beta2": 0.9, "d_steps": 1, "n_images": 4096, "data": None, "seed": 0,
    "dtype": "float32",
}
DEFAULT_STEPS = 500
# Settings that may change when resuming (the rest must match the checkpoint).
RESUMABLE_CHANGES = ("steps", "device", "attention", "backend")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT, LOG = "checkpoint.pt", "log.jsonl"
# Files written into --out, whose `.tmp` a killed run may leave behind (removed at the next start).
_OUTPUTS = (CHECKPOINT, "checkpoint.prev.pt", LOG, "config.json", "summary.json", "samples.png", "losses.png",
            "samples/step_*.png")
# module -> package of the [train] extra
_TRAIN_PACKAGES = {"PIL": "pillow", "matplotlib": "matplotlib", "tqdm": "tqdm"}
_ALREADY_A_RUN = ("--out {out!r} already holds a run (" + CHECKPOINT + "): pass --resume to continue it "
                  "or choose another --out")


_positive_int = number_type(int, strict=True)
_non_negative_int = number_type(int, what="an integer >= 0")
_positive_float = number_type(float, strict=True, what="a positive finite number")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastattn train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--out", default="runs/fastattn-gan", help="output folder (default %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"train until this step (default {DEFAULT_STEPS}; on --resume: the total, not extra steps)")
    p.add_argument("--seed", type=int, default=None, help=f"seed of weights, data and noise (default {d['seed']})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    p.add_argument("--attention", choices=("naive", "fastattn"), default="fastattn",
                   help="self-attention implementation (default %(default)s); checkpoints move between them")
    p.add_argument("--backend", default=None, help="fastattn backend to force (default: automatic choice)")
    p.add_argument("--data", default=None, help="folder of your images (default: generated coloured shapes)")
    p.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {CHECKPOINT}")
    g = p.add_argument_group("model and data (fixed for a run; defaults in brackets)")
    g.add_argument("--resolution", type=_positive_int, default=None, help=f"image side, a power of two [{d['resolution']}]")
    g.add_argument("--ch", type=_positive_int, default=None, help=f"base channel width [{d['ch']}]")
    g.add_argument("--z-dim", type=_positive_int, default=None, help=f"latent size [{d['z_dim']}]")
    g.add_argument("--g-attn-res", type=_non_negative_int, default=None,
                   help=f"generator attention resolution, 0 for none [{d['g_attn_res']}]")
    g.add_argument("--d-attn-res", type=_non_negative_int, default=None,
                   help=f"discriminator attention resolution, 0 for none [{d['d_attn_res']}]")
    g.add_argument("--attn-pool", action="store_const", const=True, default=None,
                   help="2x2 max-pool keys/values (BigGAN layout; default: unpooled SAGAN layout)")
    g.add_argument("--no-spectral-norm", dest="spectral_norm", action="store_const", const=False, default=None)
    g.add_argument("--unconditional", dest="conditional", action="store_const", const=False, default=None,
                   help="ignore class labels")
    g.add_argument("--batch-size", type=_positive_int, default=None, help=f"[{d['batch_size']}]")
    g.add_argument("--lr-g", type=_positive_float, default=None, help=f"[{d['lr_g']}]")
    g.add_argument("--lr-d", type=_positive_float, default=None, help=f"[{d['lr_d']}]")
    g.add_argument("--d-steps", type=_positive_int, default=None, help=f"D updates per G update [{d['d_steps']}]")
    g.add_argument("--n-images", type=_positive_int, default=None,
                   help=f"size of the generated shapes dataset [{d['n_images']}]")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None, help=f"[{d['dtype']}]")
    o = p.add_argument_group("output")
    o.add_argument("--sample-every", type=_non_negative_int, default=100,
                   help="sample grid, FD8 and loss plot every this many steps, 0: only at the end (default %(default)s)")
    o.add_argument("--ckpt-every", type=_non_negative_int, default=250,
                   help="checkpoint every this many steps, 0: only at the end (default %(default)s)")
    o.add_argument("--fd-samples", type=_non_negative_int, default=512,
                   help="samples for FD8, 0 to skip it (default %(default)s)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)")
    return p


def _resolve_config(parser, args, saved: dict | None) -> dict:
    explicit = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    if saved is not None:
        clashes = {k: (v, saved[k]) for k, v in explicit.items() if k in saved and saved[k] != v}
        if clashes:
            parser.error("--resume: these settings differ from the run in --out: " + ", ".join(
                f"--{k.replace('_', '-')} {v!r} (the run has {s!r})" for k, (v, s) in clashes.items())
                + f"; only {', '.join('--' + k for k in RESUMABLE_CHANGES)} may change")
        return {**DEFAULTS, **saved, **explicit}
    return {**DEFAULTS, **explicit}


def _resolve_device(parser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}")
    return device


def _check_backend(parser, name: str | None, attention: str) -> None:
    if name is None:
        return
    if attention != "fastattn":
        parser.error(f"--backend {name!r} applies to --attention fastattn only, got --attention {attention}")
    from ..dispatch import available_backends

    backends = available_backends()
    if name not in backends:
        parser.error(f"--backend must be one of {sorted(backends)}, got {name!r}")
    reasons = backends[name].unavailable()
    if reasons:
        parser.error(f"--backend {name!r} cannot run here: {'; '.join(reasons)}")


def _load_dataset(parser, config: dict):
    try:
        if config["data"] is None:
            return shapes_dataset(config["resolution"], config["n_images"], config["seed"])
        return folder_dataset(config["data"], config["resolution"])
    except ValueError as error:
        parser.error(str(error))


def _build_models(parser, config: dict, n_classes: int, attention: str, backend):
    common = dict(ch=config["ch"], n_classes=n_classes, attn_pool=config["attn_pool"],
                  spectral_norm=config["spectral_norm"], attention=attention, backend=backend)
    torch.manual_seed(config["seed"])
    try:
        G = Generator(config["resolution"], z_dim=config["z_dim"], attn_resolution=config["g_attn_res"] or None, **common)
    except ValueError as error:
        parser.error(f"--g-attn-res/--resolution/--ch: {error}")
    try:
        D = Discriminator(config["resolution"], attn_resolution=config["d_attn_res"] or None, **common)
    except ValueError as error:
        parser.error(f"--d-attn-res/--resolution/--ch: {error}")
    return G, D


def _read_log(parser, path: Path, step: int) -> list[dict]:
    """The log's rows up to `step` (the checkpoint's), saying on stderr what is torn or missing."""
    try:
        rows, note = read_jsonl(path)
    except RunFileError as error:
        parser.error(f"--resume: {error}")
    if note:
        print(f"fastattn train: {note}", file=sys.stderr)
    by_step = {}
    for row in rows:
        if isinstance(row.get("step"), int) and row["step"] <= step:
            by_step[row["step"]] = row  # a step logged twice (by an older fastattn): keep the last
    missing = [s for s in range(1, step + 1) if s not in by_step]
    if missing or len(by_step) != sum(1 for r in rows if isinstance(r.get("step"), int) and r["step"] <= step):
        print(f"fastattn train: warning: {path} " + (f"has no record of {len(missing)} of the checkpoint's "
              f"{step} steps ({_ranges(missing)}); they are lost, training continues" if missing else
              "logged some steps twice; the last record of each is kept"), file=sys.stderr)
    return [by_step[s] for s in sorted(by_step)]


def _ranges(numbers: list[int]) -> str:
    spans, first = [], None
    for i, n in enumerate(numbers):
        if first is None:
            first = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"step {first}" if first == n else f"steps {first}-{n}")
            first = None
    return ", ".join(spans[:5]) + (", ..." if len(spans) > 5 else "")


class _Evaluator:
    """Fixed sample grid and FD8 inputs, drawn from their own seeds so they never disturb training."""

    def __init__(self, trainer: GANTrainer, dataset, seed: int, fd_samples: int):
        self.trainer = trainer
        rng = torch.Generator().manual_seed(seed + 3)
        n_classes = trainer.n_classes
        rows = min(n_classes, 10) if n_classes else 8
        self.grid_z, _ = trainer.fake_inputs(8 * rows, rng)
        self.grid_y = torch.arange(rows).repeat_interleave(8) if n_classes else None
        self.fd_samples = fd_samples
        if fd_samples:
            self.fd_z, self.fd_y = trainer.fake_inputs(fd_samples, rng)
            order = torch.randperm(len(dataset), generator=rng)
            half = min(fd_samples, len(dataset) // 2)
            data = dataset.batch(order[:half], torch.float64)[0]
            other = dataset.batch(order[half:2 * half], torch.float64)[0]
            self.data_features = pooled_features(data)
            self.fd8_floor = frechet_distance(pooled_features(other), self.data_features) if half >= 2 else None

    def grid(self, path: Path) -> None:
        save_grid(self.trainer.sample(self.grid_z, self.grid_y), path, nrow=8)

    def fd8(self) -> float | None:
        return fd8(self.trainer.sample(self.fd_z, self.fd_y), self.data_features) if self.fd_samples else None


def _check_train_packages(parser) -> None:
    """Before anything is written: the packages of the [train] extra must be importable."""
    missing = []
    for module, package in _TRAIN_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        parser.error(f"fastattn train needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                     f"not installed here: pip install \"fastattn[train]\"")


def _load_checkpoint(parser, path: Path) -> dict:
    try:
        state = load_checkpoint(path, required=("trainer", "config", "extra", "target_steps"))
        if not isinstance(state["trainer"], dict) or not isinstance(state["trainer"].get("step"), int):
            raise CheckpointError(path, "holds no trainer state with a step count")
        if not isinstance(state["config"], dict) or set(state["config"]) - set(DEFAULTS):
            raise CheckpointError(path, "holds a config that is not one of fastattn train's")
        return state
    except CheckpointError as error:
        parser.error(f"--resume: {error}.\n{_what_to_do(path)}")


def _what_to_do(path: Path) -> str:
    previous = previous_checkpoint(path)
    text = (f"Start a fresh run (another --out, or empty {path.parent}) or go back to an earlier checkpoint"
            + (f": the previous one is {previous}; move it to {path} and pass --resume again"
               if previous.exists() else ""))
    return text


def _check_backend_runs(parser, args, config: dict, device: torch.device) -> None:
    """The backend named by --backend or FASTATTN_BACKEND must take this run's attention inputs,
    checked now (on small inputs of the real device, dtype and widths) so the advice is in CLI terms."""
    from ..dispatch import ENV_VAR, available_backends

    if args.attention != "fastattn":
        return
    name, flag = args.backend, f"--backend {args.backend}"
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or None
        flag = f"{ENV_VAR}={name} (from the environment)"
    if name is None:
        return
    backends = available_backends()
    if name not in backends:
        parser.error(f"{flag}: the backend must be one of {sorted(backends)}; unset {ENV_VAR} "
                     f"or pass --backend torch")
    fixes = ("pass --backend torch or leave --backend out for the automatic choice" if args.backend else
             f"unset {ENV_VAR}, or pass --backend torch (it overrides the variable)")
    if device.type == "cpu":
        fixes = "use --device cuda (the Triton kernels run on CUDA GPUs), or " + fixes
    dtype = DTYPES[config["dtype"]]
    for attn_res in (config["g_attn_res"], config["d_attn_res"]):
        if not attn_res:
            continue
        width = config["ch"]  # the narrowest a layer is; only device, dtype and size limits matter here
        n_keys = (attn_res // 2) ** 2 if config["attn_pool"] else attn_res ** 2
        q = torch.empty(1, max(1, width // 8), attn_res ** 2, device=device, dtype=dtype)
        k = torch.empty(1, q.shape[1], n_keys, device=device, dtype=dtype)
        v = torch.empty(1, width, n_keys, device=device, dtype=dtype)
        reasons = backends[name].reasons(q, k, v)
        if reasons:
            parser.error(f"{flag} cannot run this run's attention ({config['dtype']} on --device {device}): "
                         f"{'; '.join(reasons)}.\nIn fastattn train: {fixes}")


def _prepare(parser, args, config: dict, device: torch.device):
    """Dataset, trainer and evaluator of a run; writes nothing."""
    _check_backend_runs(parser, args, config, device)
    dataset = _load_dataset(parser, config)
    n_classes = dataset.n_classes if config["conditional"] else 0
    G, D = _build_models(parser, config, n_classes, args.attention, args.backend)
    trainer = GANTrainer(G, D, dataset, batch_size=config["batch_size"], lr_g=config["lr_g"], lr_d=config["lr_d"],
                         betas=(config["beta1"], config["beta2"]), d_steps=config["d_steps"], seed=config["seed"],
                         device=device, dtype=DTYPES[config["dtype"]])
    evaluator = _Evaluator(trainer, dataset, config["seed"], args.fd_samples)
    return dataset, n_classes, trainer, evaluator


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_train_packages(parser)
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    if args.resume and not ckpt_path.exists():
        parser.error(f"--resume: no {CHECKPOINT} in --out {str(out)!r} to resume from")
    if not args.resume and ckpt_path.exists():
        parser.error(_ALREADY_A_RUN.format(out=str(out)))
    device = _resolve_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_backend(parser, args.backend, args.attention)
    prepared = None
    if not args.resume:  # everything that can fail on the arguments fails before --out is created
        config = _resolve_config(parser, args, None)
        prepared = _prepare(parser, args, config, device)
        out.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(out):
            remove_stale_tmp(out, _OUTPUTS)
            return _run(parser, args, out, device, prepared)
    except RunLockedError as error:
        parser.error(str(error))
    except RunFileError as error:
        resume = " (then continue the run with --resume)" if ckpt_path.exists() else ""
        parser.exit(1, f"fastattn train: error: {error}{resume}\n")


def _run(parser, args, out: Path, device: torch.device, prepared) -> int:
    """The run, with --out locked."""
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    saved_state = None
    if args.resume:
        saved_state = _load_checkpoint(parser, ckpt_path)
        config = _resolve_config(parser, args, saved_state["config"])
        prepared = _prepare(parser, args, config, device)
    elif ckpt_path.exists():  # another run finished in --out while this one was getting ready
        parser.error(_ALREADY_A_RUN.format(out=str(out)))
    else:
        config = _resolve_config(parser, args, None)
    dataset, n_classes, trainer, evaluator = prepared
    steps = args.steps or (saved_state or {}).get("target_steps") or DEFAULT_STEPS
    if saved_state:
        at = saved_state["trainer"]["step"]
        if steps < at:
            parser.error(f"--resume --steps {steps}: the run in --out {str(out)!r} is already at step {at}; "
                         f"--steps is the total, so pass --steps {at} or more")
        try:
            trainer.load_state_dict(saved_state["trainer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            parser.error(f"--resume: {ckpt_path} does not fit the model its own config describes "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}).\n"
                         f"{_what_to_do(ckpt_path)}")
        extra = saved_state["extra"]
        rows = _read_log(parser, log_path, trainer.step)
    atomic_write_text(out / "config.json", _json({**config, "attention": args.attention, "backend": args.backend,
                                                  "device": str(device), "steps": steps,
                                                  "dataset": dataset.source, "n_classes": n_classes}))
    if not saved_state:
        extra = {"fd8_initial": evaluator.fd8(), "seconds": 0.0}
        evaluator.grid(out / "samples" / "step_000000.png")
        rows = []
    atomic_write_text(log_path, "".join(json_line(r) for r in rows))

    def report(row: dict | None) -> None:
        evaluator.grid(out / "samples" / f"step_{trainer.step:06d}.png")
        evaluator.grid(out / "samples.png")
        if row is not None:
            row["fd8"] = evaluator.fd8()
        if rows:
            plot_losses(rows, out / "losses.png", f"{args.attention} attention, {dataset.source}",
                        extra.get("fd8_initial"), getattr(evaluator, "fd8_floor", None))

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=min(trainer.step, steps), desc="fastattn train", disable=args.quiet,
               dynamic_ncols=True)
    with log_path.open("a", encoding="utf-8") as log:
        while trainer.step < steps:
            start = time.perf_counter()
            row = trainer.train_step()
            row["seconds"] = time.perf_counter() - start
            extra["seconds"] += row["seconds"]
            rows.append(row)
            last = trainer.step == steps
            if last or (args.sample_every and trainer.step % args.sample_every == 0):
                report(row)
            _append(log, log_path, json_line(row))
            if last or (args.ckpt_every and trainer.step % args.ckpt_every == 0):
                _sync(log, log_path)  # every row the checkpoint covers is on disk before it
                save_checkpoint({"trainer": trainer.state_dict(), "config": config, "extra": extra,
                                 "target_steps": steps}, ckpt_path)
            bar.update(1)
            bar.set_postfix(loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}", refresh=False)
    bar.close()
    if not rows or rows[-1]["step"] != trainer.step:  # resumed a finished run: refresh the pictures
        report(None)
    summary = _summary(rows, extra, evaluator, trainer.step)
    atomic_write_text(out / "summary.json", _json(summary))
    print(_summary_line(summary, out))
    return 0


def _json(value) -> str:
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def _append(log, path: Path, line: str) -> None:
    try:
        log.write(line)
        log.flush()
    except OSError as error:
        raise _log_error(path, error) from error


def _sync(log, path: Path) -> None:
    try:
        os.fsync(log.fileno())
    except OSError as error:
        raise _log_error(path, error) from error


def _log_error(path: Path, error: OSError) -> RunFileError:
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return RunFileError(f"the disk is full: appending to {path} failed ({error.strerror}); its last line may "
                            f"be torn, which the next --resume drops. Free some space and run again")
    return RunFileError(f"cannot append to {path}: {error}")


def _summary(rows: list[dict], extra: dict, evaluator: _Evaluator, step: int) -> dict:
    tail = rows[-max(1, len(rows) // 10):]
    fd_final = next((r["fd8"] for r in reversed(rows) if r.get("fd8") is not None), None)
    fd_initial = extra.get("fd8_initial")
    return {
        "steps": step,
        "train_seconds": extra["seconds"],
        "fd8_initial": fd_initial,
        "fd8_final": fd_final,
        "fd8_data_floor": getattr(evaluator, "fd8_floor", None),
        "fd8_ratio": fd_final / fd_initial if fd_final is not None and fd_initial else None,
        "last_10pct_mean": {k: sum(r[k] for r in tail) / len(tail) for k in ("loss_d", "loss_g", "d_acc")}
        if tail else None,
    }


def _summary_line(summary: dict, out: Path) -> str:
    text = f"trained to step {summary['steps']} in {summary['train_seconds']:.0f} s; outputs in {out}"
    if summary["fd8_ratio"] is not None:
        floor = summary["fd8_data_floor"]
        text += (f"\nFD8 samples-to-data {summary['fd8_initial']:.3g} -> {summary['fd8_final']:.3g} "
                 f"(x{summary['fd8_ratio']:.2f}"
                 + (f"; the data against another draw of itself: {floor:.3g})" if floor is not None else ")"))
    return text
