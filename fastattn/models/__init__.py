"""The reference attention GAN: SAGAN/BigGAN-style generator and discriminator with the fastattn
self-attention layer (or the naive one, for comparison), hinge loss and a resumable trainer."""
from .blocks import ATTENTION_CHOICES, ConditionalBatchNorm2d, DBlock, GBlock, attention_layers, make_attention
from .gan import Discriminator, Generator, discriminator_widths, generator_widths
from .losses import d_accuracy, hinge_loss_d, hinge_loss_g
from .trainer import GANTrainer, attention_gamma

__all__ = [
    "ATTENTION_CHOICES",
    "ConditionalBatchNorm2d",
    "DBlock",
    "Discriminator",
    "GANTrainer",
    "GBlock",
    "Generator",
    "attention_gamma",
    "attention_layers",
    "d_accuracy",
    "discriminator_widths",
    "generator_widths",
    "hinge_loss_d",
    "hinge_loss_g",
    "make_attention",
]
