"""Training data for the reference GAN: a folder of the user's images, or a dataset of
procedurally drawn coloured shapes with class labels that the package generates itself (no
downloads), so that `fastattn train` works out of the box.

Both are held in memory as uint8 (N, 3, R, R) and served as float batches in [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ImageDataset", "SHAPE_CLASSES", "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO",
           "shapes_dataset", "folder_dataset", "render_shapes"]

SHAPE_CLASSES = ("circle", "square", "triangle", "ring")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class ImageDataset:
    images: Tensor  # uint8 (N, 3, R, R)
    labels: Tensor  # int64 (N,)
    class_names: tuple[str, ...] = field(default_factory=tuple)  # empty: unconditional
    source: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Images (len(indices), 3, R, R) in [-1, 1] as `dtype`, and their labels."""
        images = self.images[indices].to(dtype).div_(127.5).sub_(1.0)
        return images, self.labels[indices]


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(B,) each in [0, 1] -> (B, 3) in [0, 1]."""
    n = torch.tensor([5.0, 3.0, 1.0])
    k = (n + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def render_shapes(labels: Tensor, resolution: int, generator: torch.Generator) -> Tensor:
    """Draw one anti-aliased shape of class `labels[i]` (index into SHAPE_CLASSES) per image, in
    a random bright colour, size, position and rotation on a random dark background.
    Returns float (B, 3, R, R) in [0, 1]."""
    b = labels.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, generator=generator)

    radius = uniform(0.22, 0.40) * resolution
    cx = radius + torch.rand(b, generator=generator) * (resolution - 2 * radius)
    cy = radius + torch.rand(b, generator=generator) * (resolution - 2 * radius)
    angle = uniform(0.0, 2 * math.pi)
    colour = _hsv_to_rgb(torch.rand(b, generator=generator), uniform(0.6, 1.0), uniform(0.75, 1.0))
    background = uniform(0.0, 0.2)[:, None] * torch.rand(b, 3, generator=generator) + 0.05
    coords = torch.arange(resolution, dtype=torch.float32) + 0.5
    px = coords[None, None, :] - cx[:, None, None]
    py = coords[None, :, None] - cy[:, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    rx, ry = cos * px + sin * py, -sin * px + cos * py
    r = radius[:, None, None]
    dist = torch.hypot(px, py)
    # signed distances in pixels, negative inside
    circle = dist - r
    square = torch.maximum(rx.abs(), ry.abs()) - 0.8 * r
    edges = [math.cos(t) * rx + math.sin(t) * ry for t in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    triangle = torch.maximum(torch.maximum(edges[0], edges[1]), edges[2]) - 0.5 * r
    ring = (dist - 0.75 * r).abs() - 0.25 * r  # hole of half the radius
    sdf = torch.stack([circle, square, triangle, ring], dim=1)
    sdf = sdf.gather(1, labels.view(b, 1, 1, 1).expand(b, 1, resolution, resolution))
    alpha = (0.5 - sdf).clamp(0, 1)  # one pixel of anti-aliasing
    return background[:, :, None, None] * (1 - alpha) + colour[:, :, None, None] * alpha


def _to_uint8(images: Tensor) -> Tensor:
    return (images * 255).round_().clamp_(0, 255).to(torch.uint8)


def shapes_dataset(resolution: int, n_images: int = 4096, seed: int = 0) -> ImageDataset:
    """`n_images` coloured shapes, balanced over the SHAPE_CLASSES, the same for the same seed."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_images) % len(SHAPE_CLASSES)
    labels = labels[torch.randperm(n_images, generator=generator)]
    chunks = [_to_uint8(render_shapes(labels[i:i + 256], resolution, generator))
              for i in range(0, n_images, 256)]
    return ImageDataset(torch.cat(chunks), labels, SHAPE_CLASSES, f"generated shapes (seed {seed})")


# Bounds on an image's header, checked before a pixel is decoded: a file claiming more pixels
# (a decompression bomb) or a stranger shape (1 x 60,000,000 pixels is 58 KB as a PNG and ~184 GB
# once its shorter side is scaled to 32) is refused with its name. 64 megapixels is a large
# camera photo; 20:1 is past any panorama worth training on.
MAX_IMAGE_PIXELS = 64 * 2**20
MAX_ASPECT_RATIO = 20


class _RefusedImage(ValueError):
    """An image whose header is out of bounds (the message says which and names the file)."""


def _check_image_size(path: Path, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise _RefusedImage(f"--data: image {path} has no pixels ({width} x {height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise _RefusedImage(f"--data: image {path} is {width} x {height} = {width * height:,} pixels, more than "
                            f"the {MAX_IMAGE_PIXELS:,} accepted (a decompression bomb, or a huge image): "
                            f"downscale it or remove it from the folder")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise _RefusedImage(f"--data: image {path} is {width} x {height} pixels, an aspect ratio of {ratio:,.0f}:1, "
                            f"more than the {MAX_ASPECT_RATIO}:1 accepted: crop it or remove it from the folder")


def _load_image(path: Path, resolution: int) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            _check_image_size(path, *image.size)
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
            image = image.resize(size, Image.BICUBIC)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except _RefusedImage:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, DecompressionBombError, struct.error, ...
        raise ValueError(f"--data: cannot read image {path}: {type(error).__name__}: {error}") from error
    return data.view(resolution, resolution, 3).permute(2, 0, 1).contiguous()


def folder_dataset(folder: str | Path, resolution: int) -> ImageDataset:
    """Every image under `folder` (recursively), resized (shorter side) and centre-cropped to
    resolution x resolution. When every image lies in a subfolder and there are two or more
    subfolders, each image is labelled by the subfolder of `folder` it lies under, at any depth
    (as torchvision's ImageFolder does: folder/cats/indoor/a.png is a "cats" image), and they
    train a class-conditional model; otherwise the model is unconditional."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--data must be a folder of images, got {str(folder)!r}, which "
                         f"{'is not a folder' if root.exists() else 'does not exist'}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"--data folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                         f"files, recursively)")
    # the class of an image: the first folder below the root on its path ("" for the root itself)
    classes = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths]
    groups = sorted(set(classes))
    conditional = len(groups) >= 2 and "" not in groups
    class_names = tuple(groups) if conditional else ()
    labels = torch.tensor([class_names.index(c) if conditional else 0 for c in classes], dtype=torch.int64)
    images = torch.stack([_load_image(p, resolution) for p in paths])
    return ImageDataset(images, labels, class_names, f"{len(paths)} images from {root}")
