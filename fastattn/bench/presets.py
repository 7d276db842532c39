"""Benchmark cases: which GAN attention sites, at which batch size, dtype and direction.

A case is one (site, batch, dtype, direction); the providers run on every case. Batch sizes come
from the cited training configs in gan_shapes.json and are scaled down to fit the device: the
naive path's (B, N, M) matrices must fit in a fraction of the device's free memory, and on a CPU
the naive forward+backward must also stay within a work cap so that a preset ends in minutes.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..constants import BENCH_CPU_WORK_CAP_FLOP, BENCH_MEMORY_FRACTION
from ..reference import default_scale
from ..shapes import GanShape, gan_shape, gan_shapes

__all__ = [
    "DIRECTIONS",
    "PENALTY_DIRECTION",
    "DTYPES",
    "PRESETS",
    "Case",
    "Site",
    "attention_flops",
    "build_cases",
    "naive_bytes",
    "parse_custom",
    "over_cpu_work_cap",
    "preset_sites",
]

DIRECTIONS = ("fwd", "bwd", "fwd+bwd", "fwd+bwd+bwd2")
# fwd+bwd+bwd2: a gradient-penalty step (R1-style): forward, a backward with create_graph=True,
# then the backward of sum |dq|^2 + |dk|^2 + |dv|^2. Run on request (--direction), not by presets.
PENALTY_DIRECTION = "fwd+bwd+bwd2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
                 "half": "float16", "float": "float32", "double": "float64"}
PRESETS = ("default", "quick", "gan", "stress", "batches")

# batches: every site of the gan preset at each of these batch sizes, up to the most the device
# allows (the gan preset's memory budget and CPU work cap, applied as if the config's batch were the
# sweep's largest): "never slower than naive at B = 1..256" is checked on it.
BATCH_SWEEP = (1, 2, 8, 32, 128, 256)
# quick: one small site of each family (pooled and unpooled), CI-sized.
QUICK_SITES = ("cifar_G", "sagan64_unpooled_G", "biggan128_G")
# stress: the high-resolution sites and the wide-head (d = C = 512) autoencoder site, B=1. On a CPU the pooled 256x256 site is left out: its naive
# path needs ~16 GiB and minutes per repeat (name it with --shape to run it anyway).
STRESS_SITES = ("biggan256_G128", "stress_unpooled128", "stress_pooled256", "autoencoder_mid512")
STRESS_SITES_CPU = ("biggan256_G128", "stress_unpooled128", "autoencoder_mid512")


@dataclass(frozen=True)
class Site:
    """One attention site (a GanShape, which carries N, M, widths and the logit scale) at the batch
    size the benchmark runs it with."""

    shape: GanShape
    B: int
    batch_note: str = ""  # why B differs from the config's batch, stated in the output

    @classmethod
    def custom(cls, id: str, B: int, N: int, M: int, d_qk: int, d_v: int, scale: float = 1.0) -> "Site":
        """A site that is not in gan_shapes.json (--custom, tests): unscaled logits unless `scale`
        is d_qk**-0.5 (then it is a one-head full-width layer, C = d_qk = d_v)."""
        full_width = d_qk == d_v and scale != 1.0
        if full_width and abs(scale - default_scale(d_qk)) > 1e-12:
            raise ValueError(f"a custom site's scale is 1.0 or d_qk**-0.5 = {default_scale(d_qk)}, got {scale}")
        shape = GanShape(id=id, family="custom", B=B, H=0, W=0, C=d_qk if full_width else 0,
                         N=N, M=M, d_qk=d_qk, d_v=d_v)
        return cls(shape, B)

    id = property(lambda self: self.shape.id)
    N = property(lambda self: self.shape.N)
    M = property(lambda self: self.shape.M)
    d_qk = property(lambda self: self.shape.d_qk)
    d_v = property(lambda self: self.shape.d_v)
    config_B = property(lambda self: self.shape.B, doc="the batch size of the cited config (or the custom request)")
    scale = property(lambda self: self.shape.scale, doc="the logit scale of the layer at this site")


@dataclass(frozen=True)
class Case:
    site: Site
    dtype: str
    direction: str

    @property
    def key(self) -> tuple:
        s = self.site
        return (s.id, s.B, s.N, s.M, s.d_qk, s.d_v, s.scale, self.dtype, self.direction)

    def flops(self) -> int:
        return attention_flops(self.site, self.direction)


def attention_flops(site: Site, direction: str) -> int:
    """Matmul FLOPs of the attention op (softmax/exp not counted).

    forward: S = Q^T K (2 B N M d_qk) and O = V P^T (2 B N M d_v).
    backward (flash-style, probabilities recomputed from the log-sum-exp): S again
    (2 B N M d_qk), dV = dO P (2 B N M d_v), dP = dO^T V (2 B N M d_v), dQ = K dS^T
    (2 B N M d_qk), dK = Q dS (2 B N M d_qk): 2 B N M (3 d_qk + 2 d_v). The naive path does not
    recompute S, but the same count is used for every provider so TFLOP/s compare like for like.
    The second backward (fastattn.backends.chunked_grad): P again (2 d_qk), dP (2 d_v), C (4 d_qk),
    dO^T gv (2 d_v), grad v (2 d_v), grad dO (4 d_v), grad q (4 d_qk), grad k (4 d_qk):
    2 B N M (7 d_qk + 5 d_v).
    """
    pairs = site.B * site.N * site.M
    fwd = 2 * pairs * (site.d_qk + site.d_v)
    bwd = 2 * pairs * (3 * site.d_qk + 2 * site.d_v)
    bwd2 = 2 * pairs * (7 * site.d_qk + 5 * site.d_v)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, PENALTY_DIRECTION: fwd + bwd + bwd2}[direction]


def naive_bytes(B: int, N: int, M: int, dtype: torch.dtype, direction: str = "fwd+bwd") -> int:
    """Approximate peak bytes of the naive path's (B, N, M) tensors: logits and probabilities
    forward; plus the probabilities' and logits' gradients backward; a double backward keeps
    about 12 (measured: tests/test_chunked_grad.py's naive peak is ~13 N x M fp32 matrices)."""
    matrices = {"fwd": 2, PENALTY_DIRECTION: 12}.get(direction, 4)
    return matrices * B * N * M * torch.empty((), dtype=dtype).element_size()


def _scaled_batch(shape: GanShape, dtype: torch.dtype, device: torch.device, free_bytes: int) -> tuple[int, str]:
    """The config's batch, reduced until the naive path fits (and, on CPU, within the work cap)."""
    budget = int(BENCH_MEMORY_FRACTION * free_bytes)
    per_sample = naive_bytes(1, shape.N, shape.M, dtype)
    batch = max(1, min(shape.B, budget // per_sample))
    reasons = []
    if batch < shape.B:
        reasons.append(f"memory: naive fwd+bwd needs {per_sample / 2**20:.0f} MiB per sample, "
                       f"budget {budget / 2**30:.1f} GiB")
    if device.type == "cpu":
        per_sample_flop = attention_flops(Site(shape, 1), "fwd+bwd")
        capped = max(1, min(batch, BENCH_CPU_WORK_CAP_FLOP // per_sample_flop))
        if capped < batch:
            reasons.append(f"CPU work cap {BENCH_CPU_WORK_CAP_FLOP / 1e9:.0f} GFLOP per fwd+bwd")
            batch = capped
    note = f"B {shape.B} -> {batch} ({'; '.join(reasons)})" if batch != shape.B else ""
    return batch, note


def preset_sites(preset: str, device: torch.device) -> tuple[list[str], str]:
    """Site ids of a preset on this device, and the preset's name after resolving `default`."""
    if preset == "default":
        preset = "gan" if device.type == "cuda" else "quick"
    if preset == "quick":
        return list(QUICK_SITES), preset
    if preset == "stress":
        return list(STRESS_SITES if device.type == "cuda" else STRESS_SITES_CPU), preset
    if preset in ("gan", "batches"):
        dropped = set(over_cpu_work_cap()) if device.type == "cpu" else set()
        return [s.id for s in gan_shapes() if s.id not in dropped], preset
    raise ValueError(f"--preset must be one of {list(PRESETS)}, got {preset!r}")


def over_cpu_work_cap() -> list[str]:
    """Sites whose naive fwd+bwd exceeds BENCH_CPU_WORK_CAP_FLOP even at B=1: the CPU `gan`
    preset leaves them to the `stress` preset (or an explicit --shape)."""
    return [s.id for s in gan_shapes()
            if attention_flops(Site(s, 1), "fwd+bwd") > BENCH_CPU_WORK_CAP_FLOP]


def preset_dtypes(preset: str, device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["bfloat16", "float16"] if preset != "quick" else ["bfloat16"]
    return ["float32"]


def preset_directions(preset: str) -> list[str]:
    return ["fwd", "fwd+bwd"] if preset in ("quick", "stress", "batches") else [d for d in DIRECTIONS if d != PENALTY_DIRECTION]


_CUSTOM_KEYS = ("B", "N", "M", "d_qk", "d_v")


def parse_custom(text: str) -> dict[str, int]:
    """'N=64,M=16,d_qk=8,d_v=16[,B=2]' -> dict; raises ValueError naming what is wrong."""
    expected = "expected e.g. 'N=64,M=16,d_qk=8,d_v=16' (optionally ',B=2'), all positive integers"
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if not match or match.group(1) not in _CUSTOM_KEYS or int(match.group(2)) < 1:
            raise ValueError(f"--custom got {text!r}: bad item {part!r}; {expected}")
        values[match.group(1)] = int(match.group(2))
    missing = [k for k in ("N", "M", "d_qk", "d_v") if k not in values]
    if missing:
        raise ValueError(f"--custom got {text!r}: missing {', '.join(missing)}; {expected}")
    values.setdefault("B", 1)
    return values


def build_cases(
    preset: str,
    device: torch.device,
    free_bytes: int,
    shape_ids: list[str] | None = None,
    dtypes: list[str] | None = None,
    directions: list[str] | None = None,
    batch: int | None = None,
    custom: dict[str, int] | None = None,
) -> tuple[list[Case], str]:
    """The cases to run and the resolved preset name. `shape_ids` filters (or, with names outside
    the preset, extends) the preset's sites; `batch` overrides the scaled batch."""
    site_ids, resolved = preset_sites(preset, device)
    if shape_ids:
        for shape_id in shape_ids:
            gan_shape(shape_id)  # raises with the known ids
        site_ids = list(shape_ids)
    dtypes = dtypes or preset_dtypes(resolved, device)
    directions = directions or preset_directions(resolved)
    sites: list[tuple[Site, str]] = []
    for dtype in dtypes:
        if custom is not None:
            b = batch or custom["B"]
            name = f"custom_N{custom['N']}_M{custom['M']}_dqk{custom['d_qk']}_dv{custom['d_v']}"
            sites.append((Site.custom(name, b, custom["N"], custom["M"], custom["d_qk"], custom["d_v"]), dtype))
            continue
        for site_id in site_ids:
            shape = gan_shape(site_id)
            if batch is not None:
                b, note = batch, (f"B {shape.B} -> {batch} (--batch)" if batch != shape.B else "")
            elif resolved == "batches":
                most, _ = _scaled_batch(dataclasses.replace(shape, B=BATCH_SWEEP[-1]), DTYPES[dtype], device,
                                        free_bytes)
                for b in (b for b in BATCH_SWEEP if b <= most):
                    sweep_note = f"batch sweep {BATCH_SWEEP[0]}-{most} (config B={shape.B})"
                    sites.append((Site(shape, b, sweep_note), dtype))
                continue
            elif resolved in ("quick", "stress"):
                b, note = 1, (f"B {shape.B} -> 1 ({resolved} preset)" if shape.B != 1 else "")
            else:
                b, note = _scaled_batch(shape, DTYPES[dtype], device, free_bytes)
            sites.append((Site(shape, b, note), dtype))
    cases = [Case(site, dtype, direction) for site, dtype in sites for direction in directions]
    return cases, resolved
