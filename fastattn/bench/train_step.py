"""`fastattn bench --preset train-step`: what a user gains in a whole training step.

One full step of the reference GAN (fastattn.models: GANTrainer.train_step, i.e. one hinge-loss
discriminator update on a real and a generated batch, then one generator update through D),
with the self-attention layers of both G and D at half the image resolution (BigGAN layout: 2x2
max-pooled keys and values, d_qk = C/8, d_v = C/2), once with the naive layer (bmm -> softmax
-> bmm) and once with fastattn, from the same weights and the same batches.

Time: both trainers live in one process and their steps are timed interleaved
(measure.time_interleaved: naive, fastattn, naive, ...), after one warm-up step each (which
allocates Adam's state). Peak memory: each variant in a fresh process (measure.peak_bytes_cpu_fresh
on CPU, the same method as the attention cases): after a warm-up step, the growth of the resident
set over one more step (VmHWM - VmRSS), i.e. the step's own working memory (activations, the
attention's matrices, gradients) on top of what is resident before it (weights, Adam state, the
data, the Python and torch runtime, reported as `resident_before_bytes`). CUDA: max_memory_allocated
over one step beyond what is allocated before it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["StepSetting", "VARIANTS", "build_trainer", "train_step_call", "run", "markdown_table"]

VARIANTS = ("naive", "fastattn")
# Chosen, not measured: BigGAN uses ch = 96 (64 at 256 px); 16 keeps a 256 px step of the naive
# layers within seconds on a 2-core CPU. A narrower network gives attention a larger share of the
# step than BigGAN's own (convolutions cost ~C^2 per pixel, attention ~N*M*C/8 per image).
DEFAULT_CH = 16
DEFAULT_RESOLUTIONS = (128, 256)
DEFAULT_BATCH = 2


@dataclass(frozen=True)
class StepSetting:
    resolution: int
    ch: int = DEFAULT_CH
    batch: int = DEFAULT_BATCH
    seed: int = 0

    @property
    def attn_resolution(self) -> int:
        return self.resolution // 2

    def attention_sizes(self) -> tuple[int, int]:
        """(N, M) of the attention layers: queries at half resolution, keys 2x2-pooled."""
        n = self.attn_resolution ** 2
        return n, n // 4


def build_trainer(setting: StepSetting, attention: str, device: torch.device | str = "cpu"):
    """A GANTrainer whose G and D have attention at resolution / 2, naive or fastattn; the same
    weights (the attention variant has the same parameters), batches and noise for either."""
    from ..models import Discriminator, GANTrainer, Generator
    from ..models.blocks import attention_layers
    from ..models.data import ImageDataset

    torch.manual_seed(setting.seed)
    common = dict(ch=setting.ch, attn_resolution=setting.attn_resolution, attn_pool=True, attention=attention)
    G = Generator(setting.resolution, **common)
    D = Discriminator(setting.resolution, **common)
    with torch.no_grad():
        for layer in attention_layers(G) + attention_layers(D):
            layer.gamma.fill_(0.5)  # as trained; gamma = 0 would make the attention output count for nothing
    gen = torch.Generator().manual_seed(setting.seed)
    images = torch.randint(0, 256, (4 * setting.batch, 3, setting.resolution, setting.resolution),
                           generator=gen, dtype=torch.uint8)
    data = ImageDataset(images, torch.zeros(len(images), dtype=torch.int64), (), "random pixels")
    return GANTrainer(G, D, data, batch_size=setting.batch, seed=setting.seed, device=device)


def train_step_call(setting: StepSetting, attention: str, device: str = "cpu"):
    """(setup, call) of one training step (the factory measure.peak_bytes_cpu_fresh sends to a
    fresh process)."""
    trainer = build_trainer(setting, attention, device)
    return (lambda: None), (lambda _: trainer.train_step())


def _backend_used(setting: StepSetting, device: torch.device) -> str:
    from ..dispatch import select_backend

    n, m = setting.attention_sizes()
    c = setting.ch * 2  # the channels at resolution / 2 (generator_widths: ch * min(16, R / r))
    q, k, v = (torch.empty(setting.batch, d, length, device=device)
               for d, length in ((max(1, c // 8), n), (max(1, c // 8), m), (max(1, c // 2), m)))
    return select_backend(q, k, v).name


def _record(setting: StepSetting, attention: str, **fields) -> dict:
    n, m = setting.attention_sizes()
    record = {"shape": f"train_step_{setting.resolution}px", **asdict(setting),
              "attn_resolution": setting.attn_resolution, "N": n, "M": m, "pool": True,
              "provider": attention, "status": "ok", "reason": None, "median_s": None, "q25_s": None,
              "q75_s": None, "n_repeats": 0, "peak_bytes": None, "resident_before_bytes": None}
    record.update(fields)
    return record


def run(settings: list[StepSetting], device: torch.device, args) -> list[dict]:
    """Records for every (setting, variant): time interleaved, peak memory in fresh processes."""
    from . import measure

    records = []
    for setting in settings:
        trainers = {a: build_trainer(setting, a, device) for a in VARIANTS}
        trainers["fastattn"].generator.load_state_dict(trainers["naive"].generator.state_dict())
        trainers["fastattn"].discriminator.load_state_dict(trainers["naive"].discriminator.state_dict())
        calls = {a: ((lambda: None), (lambda _, t=t: t.train_step())) for a, t in trainers.items()}
        outcomes = measure.time_interleaved(calls, device, args.min_time, args.min_repeats, args.repeats)
        backend = _backend_used(setting, device)
        for attention, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                records.append(_record(setting, attention, status="error",
                                       reason=f"{type(outcome).__name__}: {outcome}"))
                continue
            timing = outcome[0]
            records.append(_record(
                setting, attention, median_s=timing.median_s, q25_s=timing.q25_s, q75_s=timing.q75_s,
                n_repeats=timing.n_repeats, times_s=timing.times_s,
                backend_used=backend if attention == "fastattn" else "naive layer (bmm -> softmax -> bmm)"))
        del trainers, calls, outcomes
        if not args.no_memory:
            for record in records[-len(VARIANTS):]:
                if record["status"] != "ok":
                    continue
                try:
                    if device.type == "cuda":
                        setup, call = train_step_call(setting, record["provider"], str(device))
                        call(setup())  # warm-up: Adam state
                        record["resident_before_bytes"] = torch.cuda.memory_allocated(device)
                        record["peak_bytes"] = measure.peak_bytes_cuda(setup, call, device)
                    else:
                        record["peak_bytes"], record["resident_before_bytes"] = measure.peak_bytes_cpu_fresh(
                            train_step_call, (setting, record["provider"]), torch.get_num_threads(),
                            with_resident=True)
                except Exception as error:
                    record["memory_error"] = f"{type(error).__name__}: {error}"
    add_derived(records)
    return records


def add_derived(records: list[dict]) -> None:
    """spread, unstable, time_vs_naive and mem_vs_naive (fastattn / naive), in place."""
    naive = {r["resolution"]: r for r in records if r["provider"] == "naive" and r["status"] == "ok"}
    for r in records:
        r.setdefault("time_vs_naive", None)
        r.setdefault("mem_vs_naive", None)
        if r["status"] != "ok":
            continue
        from .measure import is_unstable, spread

        r["spread"] = spread(r["q25_s"], r["median_s"], r["q75_s"])
        r["unstable"] = is_unstable(r["spread"])
        base = naive.get(r["resolution"])
        if base is not None:
            r["time_vs_naive"] = r["median_s"] / base["median_s"]
            if base.get("peak_bytes") and r.get("peak_bytes") is not None:
                r["mem_vs_naive"] = r["peak_bytes"] / base["peak_bytes"]


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown_table(records: list[dict]) -> str:
    """One row per resolution: naive and fastattn side by side, ratios fastattn / naive."""
    head = ["image px", "attention at (N x M)", "B", "ch", "naive ms", "fastattn ms", "time: fastattn / naive",
            "spread naive / fastattn", "naive step MiB", "fastattn step MiB", "memory: fastattn / naive",
            "resident before MiB (naive / fastattn)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    by_resolution: dict[int, dict] = {}
    for r in records:
        by_resolution.setdefault(r["resolution"], {})[r["provider"]] = r
    for resolution, pair in by_resolution.items():
        naive, ours = pair.get("naive"), pair.get("fastattn")
        any_ = naive or ours
        failed = [r for r in (naive, ours) if r is None or r["status"] != "ok"]
        row = [f"{resolution}", f"{any_['attn_resolution']}x{any_['attn_resolution']} ({any_['N']} x {any_['M']})",
               str(any_["batch"]), str(any_["ch"])]
        if failed:
            row += ["; ".join(f"{r['provider']}: {r['status']}: {r['reason']}" for r in failed if r)] + [""] * 7
        else:
            def spread_text(r):
                return f"±{50 * r['spread']:.0f}%" + (" UNSTABLE" if r["unstable"] else "")
            row += [f"{1e3 * naive['median_s']:.0f}", f"{1e3 * ours['median_s']:.0f}", f"{ours['time_vs_naive']:.2f}",
                    f"{spread_text(naive)} / {spread_text(ours)}", _mib(naive.get("peak_bytes")),
                    _mib(ours.get("peak_bytes")),
                    "-" if ours.get("mem_vs_naive") is None else f"{ours['mem_vs_naive']:.2f}",
                    f"{_mib(naive.get('resident_before_bytes'))} / {_mib(ours.get('resident_before_bytes'))}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
