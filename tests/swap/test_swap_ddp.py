"""A swapped model under DistributedDataParallel: two CPU processes (gloo), each with half the
batch, give the same gradients as one process running the unswapped model on the full batch."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn
from fastattn.testing import assert_close
from gan_families import SmallDiscriminator, SmallGenerator, residual_scalars_nonzero

WORLD = 2
BATCH = 4


def _models():
    torch.manual_seed(0)
    gen = residual_scalars_nonzero(SmallGenerator().double())
    disc = residual_scalars_nonzero(SmallDiscriminator(norm_block=False).double())
    return gen, disc


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(BATCH, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0])


def _loss(gen, disc, z, y):
    score, attention = disc(gen(z, y))
    return score.mean() + 0.1 * attention[:, 3].square().sum(dim=-1).mean()


def _worker(rank, init_file, out_file):
    """Run one rank, then leave with os._exit: at interpreter exit, gloo's C++ threads were
    seen to abort a finished rank now and then ("terminate called without an active
    exception", SIGABRT), failing a test whose work was done. A failure is re-raised, so it
    still reaches mp.spawn with its traceback."""
    _rank_body(rank, init_file, out_file)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _rank_body(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        gen, disc = _models()
        fastattn.swap_attention(gen, backend="torch", strict=True)
        fastattn.swap_attention(disc, backend="torch", strict=True)
        ddp_gen = torch.nn.parallel.DistributedDataParallel(gen)
        ddp_disc = torch.nn.parallel.DistributedDataParallel(disc)
        z, y = _batch()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        _loss(ddp_gen, ddp_disc, z[part], y[part]).backward()
        if rank == 0:
            grads = {f"gen.{n}": p.grad for n, p in gen.named_parameters()}
            grads.update({f"disc.{n}": p.grad for n, p in disc.named_parameters()})
            torch.save(grads, out_file)
        dist.barrier()  # leave together: a rank exiting while gloo still talks to it aborts
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_process_ddp_gradients_equal_single_process_full_batch(tmp_path):
    init_file, out_file = tmp_path / "rendezvous", tmp_path / "grads.pt"
    mp.spawn(_worker, args=(str(init_file), str(out_file)), nprocs=WORLD, join=True)
    ddp_grads = torch.load(out_file)

    gen, disc = _models()  # the user's unswapped model, one process, full batch
    _loss(gen, disc, *_batch()).backward()
    single = {f"gen.{n}": p.grad for n, p in gen.named_parameters()}
    single.update({f"disc.{n}": p.grad for n, p in disc.named_parameters()})
    assert sorted(ddp_grads) == sorted(single)
    for name, grad in single.items():
        assert_close(ddp_grads[name], grad, name=f"DDP grad of {name}")
    assert any(float(single[n].abs().sum()) > 0 for n in single if "attn1.theta" in n), \
        "attention parameters got no gradient: the test would not see a wrong attention backward"
