"""The attention shapes of widely used attention-GAN configurations.

`gan_shapes.json` ships inside the package (a copy of the project's ../shared/gan_shapes.json,
checked identical by tests/test_shapes.py when that file is present), so installed users get the
same presets as the repository.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .reference import default_scale

__all__ = ["GanShape", "gan_shapes", "gan_shape"]


@dataclass(frozen=True)
class GanShape:
    id: str
    family: str
    B: int
    H: int
    W: int
    C: int
    N: int
    M: int
    d_qk: int
    d_v: int
    headline: bool = False
    illustrative: bool = False

    @property
    def pooled(self) -> bool:
        return self.M != self.N

    @property
    def one_head_full_width(self) -> bool:
        """q/k as wide as the input (d_qk = d_v = C): the single-head attention of GAN-trained
        autoencoders' mid-blocks (VQGAN, latent-diffusion VAEs), as opposed to SAGAN's C // 8."""
        return self.d_qk == self.d_v == self.C

    @property
    def scale(self) -> float:
        """The logit scale the layer at this site uses: SAGAN-family layers do not scale (1.0);
        the full-width autoencoder layers scale by C**-0.5, like scaled_dot_product_attention."""
        return default_scale(self.d_qk) if self.one_head_full_width else 1.0

    def with_batch(self, batch: int) -> "GanShape":
        return GanShape(**{**self.__dict__, "B": batch})


@lru_cache(maxsize=None)
def gan_shapes() -> tuple[GanShape, ...]:
    text = resources.files("fastattn").joinpath("gan_shapes.json").read_text()
    return tuple(GanShape(**row) for row in json.loads(text)["shapes"])


def gan_shape(shape_id: str) -> GanShape:
    for shape in gan_shapes():
        if shape.id == shape_id:
            return shape
    raise ValueError(f"shape id must be one of {[s.id for s in gan_shapes()]}, got {shape_id!r}")
