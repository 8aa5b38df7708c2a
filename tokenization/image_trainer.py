"""Warm-up training of the image tokenizer: ``L_total = L_rec + L_sem`` (NExT-OMNI).

One :meth:`ImageTokenizerTrainer.step` optimises the generator side (encoder, quantiser,
decoder, caption encoder) on

    L_G_total = w_1 |x - x_hat|_1 + w_2 |x - x_hat|_2^2      (L_R)
              + L_VQ                                          (commitment; EMA codebook)
              + lambda_G * L_G      once step >= gan_start_step (lambda_G adaptive)
              + lambda_sem * L_constra   when captions are given

and then, once the GAN is on, the PatchGAN discriminator on the hinge loss. The GAN starts
late (as in VQGAN) because an adversary against blurry early reconstructions only adds noise,
and its weight is VQGAN's adaptive one (``gan_adaptive``): ``gan_weight`` times the ratio of the
reconstruction's to the adversarial term's gradient norm at the decoder's output layer. With a
fixed ``lambda_G = 0.1`` the adversarial gradient dominated and held-out PSNR fell for as long
as it trained (demo settings, 400 steps: 21.6 dB at the start, 20.6 after; 21.7 adaptive,
21.8-22.1 without the GAN).
The loss weights are this implementation's; the paper states the sum without them.

Training images are augmented (random flips and translations, reflect-padded): with a few
dozen images the codebook otherwise memorises their patches (train PSNR 24 dB, held-out 20).
Each step also cuts random square crops from the images kept at ``source_scale`` times the
resolution (:func:`random_crops`), so zoomed views add content the images at R do not have.
On the demo (46 images, 400 steps) held-out PSNR without crops peaked at 21.9 dB within 100
steps and then declined as the warm-up fitted the training images (21.4 after 1200 steps);
with crops of 1/4 to all of a 256 px copy it reaches 22.2 and holds, and the training images
score no better than the held-out ones (21.7 dB): nothing is memorised any more.
The learning rate warms up linearly, then follows a cosine to ``min_lr_ratio`` over the
warm-up's budget (``progress``, see :func:`lr_scale`), so a run cut short by its time
budget still ends at a low learning rate.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from tokenization.config import ImageTrainerConfig
from tokenization.image import ImageTokenizer, output_layer
from tokenization.image_losses import (
    CaptionEncoder,
    PatchDiscriminator,
    contrastive_loss,
    discriminator_hinge_loss,
    generator_hinge_loss,
)


def lr_scale(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then a cosine from 1 to
    ``min_ratio`` as ``progress`` (the share of the budget spent, in [0, 1]) goes 0 -> 1."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warm * (min_ratio + (1 - min_ratio) * cosine)


def random_crops(images: torch.Tensor, side: int, min_crop: float) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 3, side, side): from each image a random square whose side is a
    uniform share in [``min_crop``, 1] of S (never below ``side``), resized with antialiasing
    as the preprocessing does, so a full-size crop is the image as the tokenizer sees it."""
    source = images.shape[-1]
    if source == side:
        return images
    smallest = max(side, round(min_crop * source))
    crops = []
    for image in images:
        crop = int(torch.randint(smallest, source + 1, ()))
        y, x = torch.randint(0, source - crop + 1, (2,)).tolist()
        window = image[None, :, y : y + crop, x : x + crop]
        crops.append(F.interpolate(window, size=(side, side), mode="bicubic", antialias=True))
    return torch.cat(crops).clamp(0.0, 1.0)


def augment_images(pixels: torch.Tensor, flip: bool, max_shift: int) -> torch.Tensor:
    """(B, 3, R, R) -> (B, 3, R, R): each image mirrored with probability 1/2 (``flip``) and
    translated by up to ``max_shift`` pixels each way, the uncovered border reflected."""
    if flip:
        mirrored = torch.rand(pixels.shape[0], device=pixels.device) < 0.5
        pixels = torch.where(mirrored[:, None, None, None], pixels.flip(-1), pixels)
    if max_shift:
        side = pixels.shape[-1]
        padded = F.pad(pixels, (max_shift,) * 4, mode="reflect")
        offsets = torch.randint(0, 2 * max_shift + 1, (pixels.shape[0], 2)).tolist()
        pixels = torch.stack(
            [padded[i, :, y : y + side, x : x + side] for i, (y, x) in enumerate(offsets)]
        )
    return pixels


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: ``10 log10(1 / MSE)``.

    For batches (B, C, H, W) it is the mean of the per-image PSNRs; MSE is floored at 1e-10.
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a.detach().float() - b.detach().float()).pow(2)
    mse = diff.flatten(1).mean(1) if diff.dim() == 4 else diff.mean().reshape(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


class ImageTokenizerTrainer:
    """Owns the optimisers, the discriminator and the caption encoder; ``step`` counts steps.

    The auxiliary networks are created on the tokenizer's device; inputs are moved there.
    """

    def __init__(self, tokenizer: ImageTokenizer, config: ImageTrainerConfig) -> None:
        device = next(tokenizer.parameters()).device
        self.tokenizer = tokenizer
        self.config = config
        self.global_step = 0
        self.discriminator = PatchDiscriminator(config.disc_width, config.disc_layers).to(device)
        self.text_encoder = CaptionEncoder(
            config.text_vocab_size,
            config.text_width,
            config.text_layers,
            config.text_heads,
            tokenizer.config.latent_dim,
            config.max_caption_tokens,
        ).to(device)
        self.generator_params = list(
            itertools.chain(tokenizer.parameters(), self.text_encoder.parameters())
        )
        adam = {"lr": config.lr, "betas": config.betas}
        self.generator_opt = torch.optim.Adam(self.generator_params, **adam)
        self.discriminator_opt = torch.optim.Adam(self.discriminator.parameters(), **adam)

    def _adaptive_weight(self, rec: torch.Tensor, gan_g: torch.Tensor) -> torch.Tensor:
        """VQGAN's balance (Esser et al. 2021, eq. 7): ``|grad L_R| / |grad L_G|`` at the
        decoder's output layer, so the adversarial term pulls as hard as the reconstruction
        times ``gan_weight`` whatever the two losses' scales."""
        layer = output_layer(self.tokenizer.decoder).weight
        rec_grad = torch.autograd.grad(rec, layer, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_g, layer, retain_graph=True)[0]
        return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    @property
    def gan_active(self) -> bool:
        return self.global_step >= self.config.gan_start_step

    def step(
        self,
        pixels: torch.Tensor,
        caption_ids: list[list[int]] | None = None,
        progress: float = 0.0,
    ) -> dict[str, float]:
        """One generator step (and one discriminator step once the GAN is on).

        ``pixels`` (B, 3, R, R) in [0, 1], or (B, 3, S, S) to crop from, augmented here;
        ``caption_ids`` None or B token-id lists, one caption per image; ``progress`` the share
        of the training budget spent, for the learning-rate schedule. Returns the weighted
        ``loss`` and the unweighted terms ``rec`` (L_R), ``vq``, ``gan_g``, ``gan_d``, ``sem``
        (0 when off), the quantiser's ``usage`` and ``perplexity``, ``lr`` and ``gan_weight``
        (the step's lambda_G).
        """
        config = self.config
        device = next(self.tokenizer.parameters()).device
        if caption_ids is not None and len(caption_ids) != pixels.shape[0]:
            raise ValueError(f"{len(caption_ids)} captions for {pixels.shape[0]} images")
        pixels = random_crops(pixels.to(device), self.tokenizer.config.resolution, config.min_crop)
        pixels = augment_images(pixels, config.flip, config.max_shift)
        lr = config.lr * lr_scale(
            self.global_step, progress, config.warmup_steps, config.min_lr_ratio
        )
        for optimiser in (self.generator_opt, self.discriminator_opt):
            for group in optimiser.param_groups:
                group["lr"] = lr
        self.tokenizer.train()
        self.text_encoder.train()
        recon, quantized, pooled = self.tokenizer(pixels)
        rec = config.l1_weight * F.l1_loss(recon, pixels) + config.l2_weight * F.mse_loss(
            recon, pixels
        )
        zero = torch.zeros((), device=device)
        gan_g, gan_d, sem = zero, zero, zero
        gan_weight = torch.tensor(config.gan_weight, device=device)  # lambda_G of this step
        if self.gan_active:
            self.discriminator.requires_grad_(False)  # D is not updated by the generator loss
            gan_g = generator_hinge_loss(self.discriminator(recon))
            self.discriminator.requires_grad_(True)
            if config.gan_adaptive:
                gan_weight = gan_weight * self._adaptive_weight(rec, gan_g)
        if caption_ids is not None:
            sem = contrastive_loss(pooled, self.text_encoder(caption_ids), config.temperature)
        total = rec + quantized.loss + gan_weight * gan_g + config.semantic_weight * sem
        self.generator_opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.generator_params, config.grad_clip)
        self.generator_opt.step()
        if self.gan_active:
            gan_d = discriminator_hinge_loss(
                self.discriminator(pixels), self.discriminator(recon.detach())
            )
            self.discriminator_opt.zero_grad(set_to_none=True)
            gan_d.backward()
            torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), config.grad_clip)
            self.discriminator_opt.step()
        self.global_step += 1
        terms = (total, rec, quantized.loss, gan_g, gan_d, sem, quantized.perplexity, gan_weight)
        values = torch.stack(terms).detach().tolist()  # one device sync, not one per term
        names = ("loss", "rec", "vq", "gan_g", "gan_d", "sem", "perplexity", "gan_weight")
        metrics = dict(zip(names, values, strict=True))
        return {**metrics, "usage": float(quantized.usage), "lr": lr}
