"""Peak memory and time of one generator training step of the reference GAN with self-attention
at 128x128 (N = 16384): the naive layer (bmm -> softmax -> bmm, a (B, N, M) matrix) against
fastattn. CPU by default, so anyone can rerun it:

    .venv/bin/python benchmarks/gan_step_memory.py                 # unpooled, M = N = 16384
    .venv/bin/python benchmarks/gan_step_memory.py --pool --batch 4  # BigGAN layout, M = 4096

Method: each variant runs in its own fresh Python subprocess (so one variant's allocations
cannot hide or inflate the other's). The child builds the generator (attention at --attn-res)
and a discriminator without attention (so only the generator's layer differs), takes one warm-up
step (Adam allocates its state there), then resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs) and takes --steps timed steps. Reported per variant: the peak RSS during
the timed steps (VmHWM), the RSS just before them, their difference (the step's own working
memory) and the median step time. With --device cuda the peak is torch.cuda.max_memory_allocated
over the timed steps instead. Results are printed side by side and written as JSON to
benchmarks/results/gan_step_memory[_<tag>].json. The /proc readings are fastattn.bench.measure's
(status_bytes, reset_peak_rss). For a whole G+D step, naive vs fastattn, interleaved, see
`fastattn bench --preset train-step`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("naive", "fastattn")


def child(args) -> dict:
    import torch

    from fastattn.bench.measure import reset_peak_rss, status_bytes
    from fastattn.models import Discriminator, Generator, hinge_loss_g

    torch.manual_seed(0)
    device = torch.device(args.device)
    G = Generator(args.resolution, ch=args.ch, z_dim=args.z_dim, attn_resolution=args.attn_res,
                  attn_pool=args.pool, attention=args.variant,
                  backend=args.backend if args.variant == "fastattn" else None).to(device)
    D = Discriminator(args.resolution, ch=args.ch, attn_resolution=None).to(device)
    for p in D.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.9))
    with torch.no_grad():
        G.attn.gamma.fill_(0.5)  # gamma = 0 would leave attention out of the gradient graph

    def step() -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        z = torch.randn(args.batch, args.z_dim, device=device)
        loss = hinge_loss_g(D(G(z)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - start

    step()  # warm-up: Adam state, allocator pools
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            reset_peak_rss()
            reset = True
        except OSError:
            reset = False
        before = status_bytes("VmRSS")
    times = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak = status_bytes("VmHWM")
        method = "VmHWM after clear_refs reset" if reset else "VmHWM of the whole process (reset refused)"
    n = args.attn_res * args.attn_res
    m = n // 4 if args.pool else n
    layer = G.attn
    if args.variant == "fastattn":  # which backend automatic choice (or --backend) ran
        from fastattn.dispatch import select_backend

        q = torch.empty(args.batch, layer.qk_channels, n, device=device)
        k = torch.empty(args.batch, layer.qk_channels, m, device=device)
        v = torch.empty(args.batch, layer.v_channels, m, device=device)
        backend_used = select_backend(q, k, v, args.backend).name
    else:
        backend_used = "fastattn.reference (bmm -> softmax -> bmm)"
    return {
        "variant": args.variant,
        "backend_used": backend_used,
        "peak_bytes": peak,
        "before_bytes": before,
        "step_bytes": peak - before,
        "median_s": statistics.median(times),
        "times_s": times,
        "method": method,
        "N": n,
        "M": m,
        "attention_matrix_bytes": args.batch * n * m * 4,
    }


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def parent(args) -> int:
    setting = ["--resolution", str(args.resolution), "--attn-res", str(args.attn_res), "--ch", str(args.ch),
               "--z-dim", str(args.z_dim), "--batch", str(args.batch), "--steps", str(args.steps),
               "--device", args.device] + (["--pool"] if args.pool else []) + \
              (["--backend", args.backend] if args.backend else [])
    results = {}
    for variant in args.variants:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, *setting],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results[variant] = {"variant": variant, "failed": f"exit code {proc.returncode}: {' | '.join(tail)}"}
        else:
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    n = args.attn_res**2
    print(f"Generator training step, attention at {args.attn_res}x{args.attn_res} (N={n}, "
          f"M={n // 4 if args.pool else n}, {'pooled' if args.pool else 'unpooled'}), resolution "
          f"{args.resolution}, ch {args.ch}, batch {args.batch}, {args.device}, {args.steps} timed steps")
    print(f"{'variant':<10}{'peak':>12}{'before':>12}{'step':>12}{'median s':>10}  backend")
    for r in results.values():
        if "failed" in r:
            print(f"{r['variant']:<10} failed: {r['failed']}")
        else:
            print(f"{r['variant']:<10}{_gib(r['peak_bytes']):>12}{_gib(r['before_bytes']):>12}"
                  f"{_gib(r['step_bytes']):>12}{r['median_s']:>10.2f}  {r['backend_used']}")
    ratio = None
    if all("failed" not in results.get(v, {"failed": 1}) for v in VARIANTS):
        naive, fast = results["naive"], results["fastattn"]
        ratio = {"peak": naive["peak_bytes"] / fast["peak_bytes"], "step": naive["step_bytes"] / fast["step_bytes"],
                 "time": naive["median_s"] / fast["median_s"]}
        print(f"naive / fastattn: peak x{ratio['peak']:.1f}, step working memory x{ratio['step']:.1f}, "
              f"time x{ratio['time']:.2f}")
    record = {
        "benchmark": "gan_step_memory",
        "setting": {k: getattr(args, k) for k in ("resolution", "attn_res", "ch", "z_dim", "batch", "steps",
                                                  "pool", "device", "backend")},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "results": results,
        "ratio_naive_over_fastattn": ratio,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gan_step_memory{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if ratio is not None else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--attn-res", type=int, default=128)
    p.add_argument("--ch", type=int, default=16, help="base width (BigGAN-128 uses 96)")
    p.add_argument("--z-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--pool", action="store_true", help="2x2 max-pooled keys/values (BigGAN layout)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, help="fastattn backend (default: automatic)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--child", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
