"""Pictures of a training run: a sample grid PNG and a loss-curve PNG, each written atomically."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .files import atomic_write

__all__ = ["save_grid", "plot_losses"]


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Write images (B, 3, R, R) in [-1, 1] as one PNG grid of `nrow` per row."""
    from PIL import Image

    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    pixels = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    for i in range(b):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = pixels[i]
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda file: Image.fromarray(array).save(file, format="PNG"))


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(rows: list[dict], path: str | Path, title: str = "", fd8_initial: float | None = None,
                fd8_floor: float | None = None) -> Path:
    """Loss curves (raw and moving average) of D and G, plus FD8 where it was measured (with the
    value before training at step 0 and the data's own floor as a dashed line, when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 50)
    fd_rows = [r for r in rows if r.get("fd8") is not None]
    fig, axes = plt.subplots(1, 2 if fd_rows else 1, figsize=(11 if fd_rows else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key, colour in (("loss_d", "tab:red"), ("loss_g", "tab:blue")):
        values = [r[key] for r in rows]
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(values, window), color=colour, label=f"{key} (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("hinge loss")
    ax.legend()
    ax.set_title(title or "losses")
    if fd_rows:
        ax = axes[0][1]
        start = [(0, fd8_initial)] if fd8_initial is not None else []
        points = start + [(r["step"], r["fd8"]) for r in fd_rows]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", color="tab:green", label="samples")
        if fd8_floor is not None:
            ax.axhline(fd8_floor, color="gray", linestyle="--", label="data vs data")
        ax.legend()
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("FD8 to the data (lower is closer)")
        ax.set_title("samples vs data")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    finally:
        plt.close(fig)
