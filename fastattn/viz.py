"""Pictures of attention: the SAGAN paper's figure of where chosen query pixels look in the image.

matplotlib is optional (the `test`/`train` extras bring it) and imported only when a PNG is drawn.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_map import AttentionMap

__all__ = ["attention_overlay", "save_attention_png"]


def attention_overlay(rows: Tensor, key_hw: tuple[int, int], image_hw: tuple[int, int]) -> Tensor:
    """Heatmaps (n, H, W) in [0, 1]: each attention row (n, M) laid on the key grid key_hw and
    stretched (nearest) over the image, divided by its maximum."""
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    key_h, key_w = key_hw
    if rows.dim() != 2 or rows.shape[1] != key_h * key_w:
        raise ValueError(f"rows must have shape (n, M) with M = {key_h}*{key_w} = {key_h * key_w} "
                         f"(key_hw={tuple(key_hw)}), got {tuple(rows.shape)}")
    grid = rows.detach().to(torch.float32).reshape(-1, 1, key_h, key_w)
    heat = F.interpolate(grid, size=tuple(image_hw), mode="nearest")[:, 0]
    peak = heat.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return heat / peak[:, None, None]


def _image_hwc(image) -> "numpy.ndarray":  # noqa: F821
    import numpy as np

    img = torch.as_tensor(image).detach().to("cpu", torch.float32)
    if img.dim() == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
        img = img.permute(1, 2, 0)
    if img.dim() == 2:
        img = img.unsqueeze(-1)
    if img.dim() != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"image must be (3, H, W), (1, H, W), (H, W, 3) or (H, W), got {tuple(torch.as_tensor(image).shape)}")
    if float(img.min()) < 0:  # GAN outputs live in [-1, 1]
        img = (img + 1) / 2
    elif float(img.max()) > 1.5:  # 0..255
        img = img / 255
    img = img.clamp(0, 1).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def save_attention_png(path, image, attention, query_pixels, *, image_index: int = 0,
                       query_hw: tuple[int, int] | None = None, key_hw: tuple[int, int] | None = None,
                       alpha: float = 0.6, dpi: int = 100) -> Path:
    """Draw where chosen query pixels attend, over the image, as a PNG (matplotlib Agg).

    image: the picture the layer saw, (3, H, W) / (H, W, 3) / (H, W), values in [-1, 1], [0, 1]
        or 0..255. attention: an `AttentionMap` (query_hw / key_hw come from it) or a (B, N, M)
        / (N, M) tensor. query_pixels: (row, col) pairs in image coordinates; each is mapped to
        the query grid query_hw. One panel per query: its attention row stretched over the image.
    Returns the path written.
    """
    # A Figure on an Agg canvas: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    picture = _image_hwc(image)
    image_h, image_w = picture.shape[:2]
    if isinstance(attention, AttentionMap):
        query_hw = query_hw or attention.query_hw
        key_hw = key_hw or attention.key_hw
        n_queries = attention.shape[1]
    else:
        if attention.dim() == 3:
            attention = attention[image_index]
        n_queries = attention.shape[0]
    if query_hw is None or key_hw is None:
        raise ValueError("query_hw and key_hw (the (h, w) grids of queries and keys) are needed "
                         "when attention is a plain tensor")
    if query_hw[0] * query_hw[1] != n_queries:
        raise ValueError(f"query_hw={tuple(query_hw)} holds {query_hw[0] * query_hw[1]} pixels but the "
                         f"attention has N={n_queries} queries")
    pixels = [tuple(int(c) for c in p) for p in query_pixels]
    for row, col in pixels:
        if not (0 <= row < image_h and 0 <= col < image_w):
            raise ValueError(f"query pixel {(row, col)} lies outside the {image_h}x{image_w} image")
    flat = [(row * query_hw[0] // image_h) * query_hw[1] + (col * query_hw[1] // image_w)
            for row, col in pixels]
    if isinstance(attention, AttentionMap):
        rows = attention[image_index, flat]
    else:
        rows = attention[torch.tensor(flat, device=attention.device)]
    heat = attention_overlay(rows, key_hw, (image_h, image_w)).numpy()

    fig = Figure(figsize=(2.2 * (len(pixels) + 1), 2.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pixels) + 1, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(pixels))]
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title("query pixels", fontsize=8)
    for (row, col), color in zip(pixels, colors):
        axes[0].scatter([col], [row], s=30, c=color, edgecolors="white", linewidths=0.8)
    for ax, (row, col), color, h in zip(axes[1:], pixels, colors, heat):
        ax.imshow(picture, interpolation="nearest")
        ax.imshow(h, cmap="inferno", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.scatter([col], [row], s=30, c=color, edgecolors="white", linewidths=0.8)
        ax.set_title(f"({row}, {col})", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
