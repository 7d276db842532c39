"""One GAN training step (hinge loss, Adam, TTUR as in SAGAN) and the state needed to resume.

Everything random in training draws from two generators owned by the trainer (one for the
data batches, one for z and fake labels), created on the CPU so that a run is the same on any
device, and saved in the checkpoint with the models, the optimizers and the step count: a
resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from .data import ImageDataset
from .blocks import attention_layers
from .losses import d_accuracy, hinge_loss_d, hinge_loss_g
from .penalties import r1_penalty

__all__ = ["GANTrainer", "attention_gamma"]

# Offsets that give the trainer's two generators seeds distinct from the model-init seed.
_DATA_SEED_OFFSET, _NOISE_SEED_OFFSET = 1_000_003, 2_000_029


def attention_gamma(model: nn.Module) -> float | None:
    """The residual scale of the model's (first) attention layer, or None without attention."""
    layers = attention_layers(model)
    return float(layers[0].gamma.detach().reshape(-1)[0]) if layers else None


def _set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


class GANTrainer:
    def __init__(self, generator: nn.Module, discriminator: nn.Module, dataset: ImageDataset, *,
                 batch_size: int, lr_g: float = 1e-4, lr_d: float = 4e-4, betas=(0.0, 0.9),
                 d_steps: int = 1, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32,
                 r1_gamma: float = 0.0, r1_every: int = 1):
        self.device, self.dtype = torch.device(device), dtype
        self.generator = generator.to(self.device, dtype)
        self.discriminator = discriminator.to(self.device, dtype)
        self.dataset, self.batch_size, self.d_steps = dataset, batch_size, d_steps
        if r1_gamma < 0 or r1_every < 1:
            raise ValueError(f"r1_gamma must be >= 0 and r1_every >= 1, got {r1_gamma} and {r1_every}")
        self.r1_gamma, self.r1_every = float(r1_gamma), int(r1_every)
        self.n_classes = getattr(generator, "n_classes", 0)
        self.z_dim = generator.z_dim
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr_g, betas=tuple(betas))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr_d, betas=tuple(betas))
        self.data_rng = torch.Generator().manual_seed(seed + _DATA_SEED_OFFSET)
        self.noise_rng = torch.Generator().manual_seed(seed + _NOISE_SEED_OFFSET)
        self.step = 0

    # --- inputs ---------------------------------------------------------------------------
    def fake_inputs(self, batch: int, rng: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        rng = self.noise_rng if rng is None else rng
        z = torch.randn(batch, self.z_dim, generator=rng, dtype=self.dtype)
        y = torch.randint(self.n_classes, (batch,), generator=rng) if self.n_classes else None
        return z.to(self.device), (y.to(self.device) if y is not None else None)

    def real_batch(self) -> tuple[Tensor, Tensor | None]:
        indices = torch.randint(len(self.dataset), (self.batch_size,), generator=self.data_rng)
        images, labels = self.dataset.batch(indices, self.dtype)
        return images.to(self.device), (labels.to(self.device) if self.n_classes else None)

    # --- training -------------------------------------------------------------------------
    def train_step(self) -> dict:
        """d_steps discriminator updates, then one generator update. Returns the step's log row."""
        G, D = self.generator, self.discriminator
        G.train()
        D.train()
        _set_requires_grad(D, True)
        r1 = None
        for i in range(self.d_steps):
            real, y_real = self.real_batch()
            z, y_fake = self.fake_inputs(self.batch_size)
            with torch.no_grad():
                fake = G(z, y_fake)
            regularise = self.r1_gamma > 0 and (self.step * self.d_steps + i) % self.r1_every == 0
            real.requires_grad_(regularise)
            d_real, d_fake = D(real, y_real), D(fake, y_fake)
            loss_d = hinge_loss_d(d_real, d_fake)
            total = loss_d
            if regularise:
                penalty = r1_penalty(d_real, real)
                total = loss_d + (0.5 * self.r1_gamma * self.r1_every) * penalty
                r1 = float(penalty.detach())
            self.opt_d.zero_grad(set_to_none=True)
            total.backward()
            self.opt_d.step()
        _set_requires_grad(D, False)  # the generator step needs no gradient for D's weights
        z, y = self.fake_inputs(self.batch_size)
        loss_g = hinge_loss_g(D(G(z, y), y))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        _set_requires_grad(D, True)
        self.step += 1
        return {
            "step": self.step,
            "loss_g": float(loss_g.detach()),
            "loss_d": float(loss_d.detach()),
            "d_real": float(d_real.detach().mean()),
            "d_fake": float(d_fake.detach().mean()),
            "d_acc": d_accuracy(d_real.detach(), d_fake.detach()),
            "gamma_g": attention_gamma(G),
            "gamma_d": attention_gamma(D),
            "r1": r1,  # E|grad_x D(x)|^2 on reals at the last regularised D update of this step, else None
        }

    @torch.no_grad()
    def sample(self, z: Tensor, y: Tensor | None = None, batch: int = 256) -> Tensor:
        """Generator output in eval mode (running BN statistics, no spectral-norm power step),
        so sampling never changes the training trajectory."""
        G = self.generator
        was_training = G.training
        G.eval()
        try:
            outs = [G(z[i:i + batch].to(self.device, self.dtype), None if y is None else y[i:i + batch].to(self.device))
                    for i in range(0, z.shape[0], batch)]
        finally:
            G.train(was_training)
        return torch.cat(outs).cpu()

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "data_rng": self.data_rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.data_rng.set_state(state["data_rng"])
        self.noise_rng.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
