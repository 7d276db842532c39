"""The reference GAN's models: shapes, conditioning, spectral norm, attention placement, errors."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fastattn.models.data import SHAPE_CLASSES, shapes_dataset
from fastattn.models import (
    Discriminator,
    Generator,
    attention_layers,
    d_accuracy,
    hinge_loss_d,
    hinge_loss_g,
)
from fastattn.models.metrics import fd8, frechet_distance, pooled_features


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(resolution=16, **kw):
    torch.manual_seed(0)
    g_kw = {"ch": 4, "z_dim": 8, "attn_resolution": resolution, **kw}
    d_kw = {"ch": 4, "attn_resolution": resolution // 2 if resolution > 8 else None, **kw}
    return Generator(resolution, **g_kw), Discriminator(resolution, **d_kw)


@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
def test_generator_makes_images_and_discriminator_one_logit_per_image(resolution):
    G, D = _tiny(resolution)
    images = G(torch.randn(3, 8))
    assert images.shape == (3, 3, resolution, resolution)
    assert images.abs().max() <= 1.0
    assert D(images).shape == (3,)


def test_generator_channel_schedule_is_biggan128s():
    G = Generator(128, ch=4, z_dim=8, attn_resolution=64, attn_pool=True)
    widths = [G.bottom_channels] + [b.conv2.out_channels for b in G.blocks]
    assert widths == [4 * m for m in (16, 16, 8, 4, 2, 1)]


@pytest.mark.parametrize("pool", [False, True])
def test_attention_sits_at_the_requested_resolution_in_both_models(pool):
    G = Generator(32, ch=4, z_dim=8, attn_resolution=16, attn_pool=pool)
    D = Discriminator(32, ch=4, attn_resolution=8, attn_pool=pool)
    seen = []
    for model in (G, D):
        (layer,) = attention_layers(model)
        layer.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[2:])))
    D(G(torch.randn(2, 8)))
    assert seen == [(16, 16), (8, 8)]


def test_no_attention_layer_when_attn_resolution_is_none():
    G, D = _tiny(16, attn_resolution=None)
    assert attention_layers(G) == [] and attention_layers(D) == []


def test_class_labels_change_generator_output_and_discriminator_logit():
    G, D = _tiny(16, n_classes=len(SHAPE_CLASSES))
    for block in G.blocks:  # the class gains start at 1: make them differ between classes
        nn.init.normal_(block.bn1.gain.weight, 1.0, 0.5)
    z = torch.randn(1, 8).repeat(2, 1)
    images = G(z, torch.tensor([0, 1]))
    assert not torch.allclose(images[0], images[1])
    same = images[:1].repeat(2, 1, 1, 1)
    logits = D(same, torch.tensor([0, 1]))
    assert not torch.allclose(logits[0], logits[1])


def test_conditional_models_ask_for_labels():
    G, D = _tiny(16, n_classes=3)
    with pytest.raises(ValueError, match=r"labels y of shape \(2,\)"):
        G(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"labels y of shape \(2,\)"):
        D(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="y must be integer class labels"):
        G(torch.randn(2, 8), torch.zeros(2))


def test_spectral_norm_wraps_every_conv_and_linear_weight():
    G, D = _tiny(16, n_classes=3)
    for model in (G, D):
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert layers
        missing = [type(m).__name__ for m in layers if not parametrize.is_parametrized(m, "weight")]
        assert not missing, f"{type(model).__name__}: no spectral norm on {missing}"
    assert parametrize.is_parametrized(D.embed, "weight")  # the projection embedding too


def test_spectral_norm_can_be_switched_off():
    G, D = _tiny(16, spectral_norm=False, attn_resolution=None)
    for model in (G, D):
        assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_naive_and_fastattn_models_have_the_same_parameters_so_checkpoints_move():
    naive_G, naive_D = _tiny(16, attention="naive")
    fast_G, fast_D = _tiny(16, attention="fastattn")
    for naive, fast in ((naive_G, fast_G), (naive_D, fast_D)):
        assert list(naive.state_dict()) == list(fast.state_dict())
        fast.load_state_dict(naive.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 30}, "resolution must be a power of two"),
        ({"resolution": 4}, "resolution must be a power of two"),
        ({"attn_resolution": 12}, r"attn_resolution must be None .* \[8, 16, 32\], got 12"),
        ({"attention": "flash"}, r"attention must be one of \('naive', 'fastattn'\), got 'flash'"),
        ({"n_classes": -1}, "n_classes must be an int >= 0"),
        ({"ch": 0}, "ch must be a positive int"),
    ],
)
def test_generator_rejects_bad_arguments_by_name(kwargs, match):
    kw = {"resolution": 32, "ch": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        Generator(kw.pop("resolution"), **kw)


def test_discriminator_rejects_attention_at_the_image_resolution():
    with pytest.raises(ValueError, match=r"discriminator's block resolutions \[16, 8\], got 32"):
        Discriminator(32, ch=4, attn_resolution=32)


def test_models_reject_wrong_input_shapes():
    G, D = _tiny(16)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8\)"):
        G(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 16, 16\)"):
        D(torch.randn(2, 3, 32, 32))


def test_hinge_losses_and_accuracy_on_known_logits():
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.25])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1.25] -> 0.625
    assert hinge_loss_d(d_real, d_fake).item() == pytest.approx(0.875)
    assert hinge_loss_g(d_fake).item() == pytest.approx(1.375)
    assert d_accuracy(d_real, d_fake) == pytest.approx(0.75)


def test_fd8_is_near_zero_for_the_data_and_large_for_noise_and_grey():
    data = shapes_dataset(16, 512, seed=0)
    a, _ = data.batch(torch.arange(256))
    b, _ = data.batch(torch.arange(256, 512))
    features = pooled_features(a)
    floor = fd8(b, features)
    grey = fd8(torch.zeros_like(b), features)
    noise = fd8(torch.rand_like(b) * 2 - 1, features)
    assert floor < 0.05 * grey and floor < 0.05 * noise, (floor, grey, noise)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_shapes_dataset_is_deterministic_balanced_and_classes_look_different():
    one, two = shapes_dataset(16, 64, seed=1), shapes_dataset(16, 64, seed=1)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert not torch.equal(one.images, shapes_dataset(16, 64, seed=2).images)
    assert one.images.dtype == torch.uint8 and one.images.shape == (64, 3, 16, 16)
    assert torch.bincount(one.labels).tolist() == [16] * len(SHAPE_CLASSES)
    # covered area (pixels brighter than the dark background) differs between classes on average:
    # a ring covers less than a circle of the same radius
    big = shapes_dataset(32, 400, seed=0)
    covered = (big.images.float().amax(dim=1) > 150).float().mean(dim=(1, 2))
    by_class = [float(covered[big.labels == c].mean()) for c in range(len(SHAPE_CLASSES))]
    assert by_class[SHAPE_CLASSES.index("ring")] < 0.85 * by_class[SHAPE_CLASSES.index("circle")], by_class
