"""Training with the fastattn layer follows the naive layer's trajectory (issue 5, part 3).

Both runs start from the same weights and draw the same batches and noise; the attention layers'
gamma is set to 0.5 first (it starts at 0, where the layer is the identity and q, k, v get no
gradient, and the comparison would prove nothing). The test then checks that attention really
contributes to the output and that its weights moved during training.
"""
import pytest
import torch

from fastattn.constants import GAN_PARITY_FP32_RTOL, GAN_PARITY_FP64_RTOL
from fastattn.models.data import shapes_dataset
from fastattn.models import Discriminator, GANTrainer, Generator, attention_layers

STEPS = 6
GAMMA = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(attention, dtype, weights=None):
    torch.manual_seed(0)
    G = Generator(16, ch=8, z_dim=16, n_classes=4, attn_resolution=16, attention=attention)
    D = Discriminator(16, ch=8, n_classes=4, attn_resolution=8, attn_pool=True, attention=attention)
    if weights is None:
        for layer in attention_layers(G) + attention_layers(D):
            with torch.no_grad():
                layer.gamma.fill_(GAMMA)
    else:
        G.load_state_dict(weights[0])
        D.load_state_dict(weights[1])
    data = shapes_dataset(16, 64, seed=0)
    return GANTrainer(G, D, data, batch_size=8, seed=0, dtype=dtype)


def _attention_weights(model):
    return [p.detach().clone() for layer in attention_layers(model) for name, p in layer.named_parameters()
            if name != "gamma"]


def _run_pair(dtype):
    naive = _trainer("naive", dtype)
    fast = _trainer("fastattn", dtype, (naive.generator.state_dict(), naive.discriminator.state_dict()))
    before = _attention_weights(naive.generator) + _attention_weights(naive.discriminator)
    rows = [(naive.train_step(), fast.train_step()) for _ in range(STEPS)]
    return naive, fast, rows, before


def _relative(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1.0)


def _attention_contribution(trainer):
    """|G(z) - G_without_attention(z)| / |G(z)| on a fixed batch (eval mode)."""
    z, y = trainer.fake_inputs(8, torch.Generator().manual_seed(5))
    with_attention = trainer.sample(z, y)
    layers = attention_layers(trainer.generator)
    saved = [layer.gamma.detach().clone() for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.gamma.zero_()
    without = trainer.sample(z, y)
    with torch.no_grad():
        for layer, gamma in zip(layers, saved):
            layer.gamma.copy_(gamma)
    return float((with_attention - without).norm() / with_attention.norm())


@pytest.mark.parametrize(
    "dtype, rtol",
    [(torch.float64, GAN_PARITY_FP64_RTOL), (torch.float32, GAN_PARITY_FP32_RTOL)],
    ids=["fp64", "fp32"],
)
def test_training_losses_with_fastattn_match_the_naive_layer_step_by_step(dtype, rtol):
    naive, fast, rows, before = _run_pair(dtype)
    worst = 0.0
    for naive_row, fast_row in rows:
        for key in ("loss_d", "loss_g", "d_real", "d_fake"):
            error = _relative(naive_row[key], fast_row[key])
            worst = max(worst, error)
            assert error <= rtol, (
                f"step {naive_row['step']} {key}: naive {naive_row[key]!r} vs fastattn {fast_row[key]!r}, "
                f"relative difference {error:.3g} > {rtol:g}"
            )
    print(f"{dtype}: worst relative loss difference over {STEPS} steps {worst:.3g} (tolerance {rtol:g})")
    # the comparison means something only if attention took part:
    contribution = _attention_contribution(naive)
    assert contribution > 1e-3, f"attention changes G's output by only {contribution:.3g} (relative)"
    after = _attention_weights(naive.generator) + _attention_weights(naive.discriminator)
    assert all(not torch.equal(b, a) for b, a in zip(before, after)), "an attention weight got no update"
    for model in ("generator", "discriminator"):
        for naive_layer, fast_layer in zip(attention_layers(getattr(naive, model)),
                                           attention_layers(getattr(fast, model))):
            assert float(naive_layer.gamma.detach()) != GAMMA  # gamma is trained too
            assert float(fast_layer.gamma.detach()) == pytest.approx(float(naive_layer.gamma.detach()), rel=max(rtol, 1e-12) * 100)
