"""Image tokenizer: a VQ-VAE that turns an R x R image into (R / downsample)^2 * K codebook ids.

NExT-OMNI (Sec. "Reconstruction-Augmented Unified Representation") uses one vision encoder
for both semantics and details: its patch features are quantised (``z_q = argmin_c ||z - c||``)
and a decoder reconstructs the pixels, trained by ``L_rec = L_R + L_VQ + L_G`` plus a CLIP-style
contrastive ``L_sem`` (see :mod:`tokenization.image_losses` and
:mod:`tokenization.image_trainer`). The encoder is a small conv net, or a CLIP ViT loaded from
``clip_init_dir`` whose patch grid plays the latent grid. Ids are laid out row-major over the
latent grid, K ids per position (the :mod:`tokenization.quantizer` layout).

``encode`` then re-chooses the nearest codes by what they decode to (``code_search`` sweeps
of :func:`tokenization.code_search.refine_codes` over the patch path's overlap-add decoder):
+0.4 dB held-out PSNR on the demo's fitted start. The training pass keeps the nearest codes,
which the straight-through gradient and the EMA codebook are defined on.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from tokenization.code_search import refine_codes
from tokenization.config import ImageTokenizerConfig
from tokenization.errors import TokenizerInputError
from tokenization.persistence import load_component, save_component
from tokenization.quantizer import (
    QuantizerOutput,
    VectorQuantizer,
    principal_directions,
    ridge_regression,
)

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # "I" (int32) holds 16-bit PNG data
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP pixel normalisation
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _norm(width: int) -> nn.GroupNorm:
    """GroupNorm with >= 4 channels per group where possible (32 groups from width 128, as in
    VQGAN). With one channel per group (instance norm) small models memorised the training
    images: held-out PSNR stayed at its initial value while train PSNR rose."""
    return nn.GroupNorm(math.gcd(32, max(1, width // 4)), width)


class _ResBlock(nn.Module):
    """(B, c_in, H, W) -> (B, c_out, H, W): two norm-SiLU-conv layers plus a skip."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _conv_decoder(channels: list[int], latent_dim: int) -> nn.Sequential:
    """(B, latent_dim, h, w) -> (B, 3, h * 2^L, w * 2^L) in about [-1, 1]; mirrors the encoder."""
    layers: list[nn.Module] = [nn.Conv2d(latent_dim, channels[-1], 3, padding=1)]
    previous = channels[-1]
    for width in reversed(channels):
        layers += [
            _ResBlock(previous, width),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1),
        ]
        previous = width
    layers += [_norm(previous), nn.SiLU(), nn.Conv2d(previous, 3, 3, padding=1)]
    return nn.Sequential(*layers)


class _ConvEncoder(nn.Module):
    """(B, 3, R, R) in [0, 1] -> latent grid (B, latent_dim, R / 2^L, R / 2^L): a stride-2
    conv and a res block per level."""

    def __init__(self, channels: list[int], latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1)]
        previous = channels[0]
        for width in channels:
            layers += [nn.Conv2d(previous, width, 4, stride=2, padding=1), _ResBlock(width, width)]
            previous = width
        layers += [_norm(previous), nn.SiLU(), nn.Conv2d(previous, latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels * 2 - 1)


class _ClipEncoder(nn.Module):
    """CLIP ViT patch features (CLS dropped) projected to latent_dim, as the latent grid:
    (B, 3, R, R) in [0, 1] -> (B, latent_dim, R / patch, R / patch)."""

    def __init__(self, vision: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.vision = vision
        self.proj = nn.Linear(vision.config.hidden_size, latent_dim)
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values=(pixels - self.mean) / self.std).last_hidden_state
        patches = self.proj(hidden[:, 1:])  # (B, N, latent_dim)
        side = math.isqrt(patches.shape[1])
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)


def _clip_encoder(config: ImageTokenizerConfig) -> tuple[_ClipEncoder, dict[str, Any]]:
    """The CLIP encoder: random weights of ``config.clip_vision`` (a saved tokenizer, whose
    weights come from its state dict) or the checkpoint in ``clip_init_dir``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if config.clip_vision is not None:
        vision = CLIPVisionModel(CLIPVisionConfig.from_dict(config.clip_vision))
    else:
        folder = Path(str(config.clip_init_dir))
        if not folder.is_dir():
            raise FileNotFoundError(f"clip_init_dir: no such directory: {folder}")
        # use_safetensors: a pytorch_model.bin (a pickle) is refused, never unpickled.
        vision = CLIPVisionModel.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32, use_safetensors=True
        )
    size, patch = vision.config.image_size, vision.config.patch_size
    if (size, patch) != (config.resolution, config.downsample):
        raise ValueError(
            f"clip_init_dir: CLIP image_size={size}, patch_size={patch} must equal "
            f"resolution={config.resolution}, downsample={config.downsample}"
        )
    return _ClipEncoder(vision, config.latent_dim), vision.config.to_dict()


def _check_side(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    if min(width, height) < min_side:
        raise TokenizerInputError(
            f"image is {width}x{height}; sides below min_side={min_side} are rejected"
        )


def _open(data: bytes, side: int, min_side: int) -> Image.Image:
    """Decode image bytes fully (Pillow is lazy), turning every failure into an input error.
    JPEGs are decoded at the smallest DCT scale that keeps both sides >= ``side`` (fast)."""
    if not data:
        raise TokenizerInputError("image bytes are empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise TokenizerInputError(f"undecodable image: {type(exc).__name__}: {exc}") from None
    _check_side(image, min_side)
    try:
        image.draft(None, (side, side))
        image.load()
    except Exception as exc:
        raise TokenizerInputError(f"undecodable image: {type(exc).__name__}: {exc}") from None
    return image


def _to_array(image: Image.Image, side: int) -> np.ndarray:
    """Any Pillow mode -> (side, side, 3) float32 in [0, 1]: short side resized to ``side``
    (bicubic), then centre-cropped. 16-bit data is scaled by 1/65535, never clipped at 255;
    transparent images are composited on white."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float32) / 65535.0  # (H, W)
        plane = ImageOps.fit(Image.fromarray(values), (side, side), Image.Resampling.BICUBIC)
        gray = np.clip(np.asarray(plane, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = ImageOps.fit(image.convert("RGB"), (side, side), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def output_layer(module: nn.Module) -> nn.Module:
    """The last module with weights: the output layer of an encoder or decoder."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]


class _PatchPath(nn.Module):
    """Linear maps between a p x p pixel patch (3 p^2 values) and its latent vector:
    ``encode`` (B, 3, R, R) in [-1, 1] -> (B, latent_dim, R / p, R / p), ``decode`` back,
    each latent drawing its own patch and reaching one patch into its 8 neighbours'
    (overlap-add), so the linear decoder can blend across patch borders.

    Fitted in closed form by :meth:`ImageTokenizer.initialise`: ``encode`` is the projection
    onto the patches' top principal directions (:meth:`fit_pca`); with a k-means codebook of
    these projections and ``decode`` the least-squares map from a 3 x 3 neighbourhood of
    codes to the patch (:meth:`fit_decoder`), the tokenizer starts as a block vector
    quantiser with a linear deblocking decoder, and the conv layers learn what it misses.
    """

    def __init__(self, patch: int, latent_dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.encode = nn.Conv2d(3, latent_dim, patch, stride=patch)
        self.decode = nn.ConvTranspose2d(latent_dim, 3, 3 * patch, stride=patch, padding=patch)

    def tables(self, codebook: torch.Tensor) -> torch.Tensor:
        """Sub-codebooks (K, V, dim / K) -> what each code adds to the 3 x 3 patches around
        its own, row-major: (K, V, 9, 3, p^2) (for :func:`refine_codes`)."""
        p = self.patch
        weight = self.decode.weight.detach().float()  # (dim, 3, 3p, 3p): taps by patch
        parts = weight.reshape(codebook.shape[0], codebook.shape[2], *weight.shape[1:])
        tables = torch.einsum("kvd,kdcyx->kvcyx", codebook.float(), parts)
        tables = tables.unflatten(-2, (3, p)).unflatten(-1, (3, p))  # (K, V, 3, 3, p, 3, p)
        return tables.permute(0, 1, 3, 5, 2, 4, 6).reshape(*tables.shape[:2], 9, 3, p * p)

    def _centre(self) -> torch.Tensor:
        """(3 p^2,): the decoder's per-channel bias repeated over a patch (unfold's order)."""
        return self.decode.bias.detach().float().repeat_interleave(self.patch**2)

    @torch.no_grad()
    def fit_pca(self, pixels: torch.Tensor) -> None:
        """PCA of the patches of ``pixels`` (M, 3, R, R) in [-1, 1], centred per channel;
        the decoder starts as the transpose (each latent drawing only its own patch)."""
        p = self.patch
        self.decode.bias.copy_(pixels.float().mean(dim=(0, 2, 3)))
        patches = F.unfold(pixels.float(), p, stride=p).transpose(1, 2).flatten(0, 1)
        centre = self._centre()
        basis = principal_directions(patches - centre, self.encode.out_channels)
        weight = basis.reshape(-1, 3, p, p).to(self.encode.weight)
        self.encode.weight.copy_(weight)
        self.encode.bias.copy_(-(basis @ centre).to(self.encode.bias))
        self.decode.weight.zero_()
        self.decode.weight[:, :, p : 2 * p, p : 2 * p] = weight

    @torch.no_grad()
    def fit_decoder(self, codes: torch.Tensor, pixels: torch.Tensor, groups: torch.Tensor) -> None:
        """Least-squares decoder (ridge, penalty cross-validated over ``groups`` (M,)) from
        code grids ``codes`` (M, latent_dim, h, w) to ``pixels`` (M, 3, R, R) in [-1, 1]."""
        p, (_, dim, h, w) = self.patch, codes.shape
        features = F.unfold(codes.float(), 3, padding=1)  # (M, dim * 9, h * w), d-major
        features = features.transpose(1, 2).flatten(0, 1)
        targets = F.unfold(pixels.float(), p, stride=p).transpose(1, 2).flatten(0, 1)
        weights, _ = ridge_regression(
            features, targets - self._centre(), groups.repeat_interleave(h * w)
        )
        # Feature (d, ky, kx) is the code at offset (ky - 1, kx - 1); ConvTranspose2d draws
        # the code at offset -1 with kernel rows [2p, 3p), at +1 with rows [0, p).
        weights = weights.reshape(dim, 3, 3, 3, p, p).flip(1, 2)  # (d, ky, kx, c, u, v)
        kernel = weights.permute(0, 3, 1, 4, 2, 5).reshape(dim, 3, 3 * p, 3 * p)
        self.decode.weight.copy_(kernel.to(self.decode.weight))


def _initialisation_views(pixels: torch.Tensor, shift: int) -> torch.Tensor:
    """(M, 3, R, R) -> (4 M, 3, R, R): the images, mirrored, and both moved by ``shift``
    pixels right and down (reflected border), in blocks of M."""
    side = pixels.shape[-1]
    both = torch.cat([pixels, pixels.flip(-1)])
    moved = F.pad(both, (shift, 0, shift, 0), mode="reflect")[..., :side, :side]
    return torch.cat([both, moved])


class ImageTokenizer(nn.Module):
    """Encoder -> vector quantiser -> decoder; see the module docstring."""

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        if config.clip_init_dir is not None or config.clip_vision is not None:
            self.encoder, vision = _clip_encoder(config)
            config = config.model_copy(update={"clip_vision": vision})
        else:
            self.encoder = _ConvEncoder(config.channels, config.latent_dim)
        self.config = config
        self.quantizer = VectorQuantizer(config.quantizer)
        self.decoder = _conv_decoder(config.channels, config.latent_dim)
        self.patches = (
            _PatchPath(config.downsample, config.latent_dim) if config.patch_path else None
        )
        if self.patches is not None:  # the convs start silent: they learn the residual
            for layer in (output_layer(self.encoder), output_layer(self.decoder)):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, config: ImageTokenizerConfig) -> ImageTokenizer:
        """A freshly initialised tokenizer (CLIP weights when ``clip_init_dir`` is set)."""
        return cls(config)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImageTokenizer:
        """Load what :meth:`save_pretrained` wrote (safetensors only), in eval mode."""
        config, state = load_component(directory, ImageTokenizerConfig)
        if "patch_path" not in config.model_fields_set:  # saved before the patch path existed
            config = config.model_copy(update={"patch_path": False})
        if "code_search" not in config.model_fields_set:  # saved before the search: its ids
            config = config.model_copy(update={"code_search": 0})  # stay what they were
        tokenizer = cls(config)
        tokenizer.load_state_dict(state)
        return tokenizer.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``."""
        save_component(directory, self.config, self)

    @property
    def grid(self) -> int:
        """Latent grid side ``R / downsample``."""
        return self.config.resolution // self.config.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2 * self.quantizer.tokens_per_vector

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    def codebook_vectors(self) -> torch.Tensor:
        """(K * codebook_size, latent_dim / K): the vector each id stands for."""
        return self.quantizer.codebook_vectors()

    def preprocess(self, image: Image.Image | bytes, side: int | None = None) -> torch.Tensor:
        """A Pillow image or encoded bytes -> (3, R, R) float32 in [0, 1] on the CPU.

        ``side`` overrides R (the warm-up keeps its training images larger, to cut random
        crops from). Raises TokenizerInputError for undecodable bytes, images with a side
        below ``min_side`` and modes Pillow cannot turn into RGB.
        """
        side = side or self.config.resolution
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = _open(bytes(image), side, self.config.min_side)
        else:
            _check_side(image, self.config.min_side)
        try:  # lazy or malformed files fail here, in Pillow's own exception types
            array = _to_array(ImageOps.exif_transpose(image), side)
        except Exception as exc:
            raise TokenizerInputError(
                f"cannot convert {image.mode} image: {type(exc).__name__}: {exc}"
            ) from None
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> (B, N, latent_dim), row-major over the grid."""
        expected = (3, self.config.resolution, self.config.resolution)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must be (B, {expected}), got {tuple(pixels.shape)}")
        latents = self.encoder(pixels)
        if self.patches is not None:
            latents = latents + self.patches.encode(pixels * 2 - 1)
        return latents.flatten(2).transpose(1, 2)

    def _reconstruct(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, N, latent_dim) -> (B, 3, R, R) in about [0, 1] (not clamped, for the losses)."""
        grid = vectors.transpose(1, 2).reshape(vectors.shape[0], -1, self.grid, self.grid)
        pixels = self.decoder(grid)
        if self.patches is not None:
            pixels = pixels + self.patches.decode(grid)
        return (pixels + 1) / 2

    @torch.no_grad()
    def initialise(self, pixels: torch.Tensor, batch: int = 64, seed: int = 0) -> None:
        """Data-dependent start from training images ``pixels`` (M, 3, R, R) in [0, 1], each
        also seen mirrored and moved by half a patch (new patch contents): the patch path's
        encoder from their PCA, the codebook from k-means of the encoder's outputs, then the
        patch path's decoder by least squares from the codes (see :class:`_PatchPath`).

        Before any step, encode -> decode is then a fitted linear codec: held-out PSNR about
        1 dB above an 8x8 palette thumbnail in the demo, where a random start is at 11 dB.
        """
        device = self.quantizer.codebook.device
        views = _initialisation_views(pixels.to(device), self.config.downsample // 2)
        groups = torch.arange(len(pixels), device=device).repeat(len(views) // len(pixels))
        if self.patches is not None:
            self.patches.fit_pca(views * 2 - 1)
        latents = torch.cat(
            [self._latents(views[i : i + batch]) for i in range(0, len(views), batch)]
        )
        generator = torch.Generator().manual_seed(seed)
        self.quantizer.initialise_from(latents.flatten(0, 1), generator)
        if self.patches is not None:
            codes = self.quantizer.ids_to_vectors(self.quantizer.nearest(latents))
            grid = codes.transpose(1, 2).reshape(len(views), -1, self.grid, self.grid)
            self.patches.fit_decoder(grid, views * 2 - 1, groups)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput, torch.Tensor]:
        """Training pass: (reconstruction (B, 3, R, R), quantizer output, pooled (B, latent_dim)).

        ``pooled`` is the mean of the pre-quantisation latents, the image side of L_sem.
        Updates the EMA codebook when in training mode.
        """
        latents = self._latents(pixels)
        quantized = self.quantizer(latents)
        return self._reconstruct(quantized.quantized), quantized, latents.mean(1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> (B, tokens_per_image) int64 ids on the model's device,
        in eval mode (no EMA update; the mode is restored afterwards)."""
        was_training = self.training
        self.eval()
        try:
            parameter = next(self.parameters())
            pixels = pixels.to(parameter.device, parameter.dtype)
            ids = self.quantizer(self._latents(pixels)).ids
            if self.patches is not None and self.config.code_search:
                ids = self._searched_ids(pixels, ids)
            return ids
        finally:
            self.train(was_training)

    def _searched_ids(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Nearest-code ids (B, N * K) of images (B, 3, R, R) -> ids refined by
        :func:`refine_codes` with squared error (PSNR's)."""
        k, p = self.quantizer.tokens_per_vector, self.config.downsample
        size = self.config.quantizer.codebook_size

        def cells(x: torch.Tensor) -> torch.Tensor:  # (B, C, R, R) -> (B, h, w, C, p^2)
            grid = x.unflatten(2, (self.grid, p)).unflatten(-1, (self.grid, p))
            return grid.permute(0, 2, 4, 1, 3, 5).flatten(-2)

        offsets = torch.arange(k, device=ids.device) * size
        codes = ids.reshape(len(ids), self.grid, self.grid, k) - offsets
        reconstruction = self._reconstruct(self.quantizer.ids_to_vectors(ids)) * 2 - 1
        codes = refine_codes(
            codes,
            cells(reconstruction),
            cells(pixels * 2 - 1),
            torch.ones(len(ids), self.grid, self.grid, 1, p * p, device=ids.device),
            self.patches.tables(self.quantizer.codebook),
            self.config.code_search,
            power=2,
        )
        return (codes + offsets).reshape(len(ids), -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, tokens_per_image) ids -> (B, 3, R, R) pixels clamped to [0, 1]."""
        if ids.dim() != 2 or ids.shape[1] != self.tokens_per_image:
            raise ValueError(f"ids must be (B, {self.tokens_per_image}), got {tuple(ids.shape)}")
        was_training = self.training
        self.eval()
        try:
            device = self.quantizer.codebook.device
            vectors = self.quantizer.ids_to_vectors(ids.to(device, torch.long))
            return self._reconstruct(vectors).clamp(0, 1)
        finally:
            self.train(was_training)
