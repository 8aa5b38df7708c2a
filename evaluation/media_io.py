"""Decoded media to files: PNG images, comparison grids, and WAV clips from log-mels.

The audio tokenizer decodes to a Whisper log-mel, not a waveform (there is no vocoder),
so a WAV is made the classic way: undo Whisper's normalisation (``mel = 10^(4x - 4)``),
map the mel bands back to linear frequencies with the pseudo-inverse of the filterbank,
and recover a phase with Griffin-Lim (Griffin & Lim 1984). Good enough to listen to what
a checkpoint produces; the metrics never go through it (mel-L1 compares the mels).
"""

from __future__ import annotations

import io

import numpy as np
import soundfile
import torch
from PIL import Image
from torch import Tensor

from tokenization.audio import HOP_LENGTH, SAMPLE_RATE

N_FFT = 400  # Whisper's STFT size


def png_bytes(pixels: Tensor) -> bytes:
    """Float[3, H, W] in [0, 1] -> PNG bytes."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array.cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def grid(top: Tensor, bottom: Tensor, gap: int = 2) -> Tensor:
    """Two rows of Float[B, 3, H, W] images (reference above, generated below) -> one
    Float[3, 2H + gap, B W + (B - 1) gap] image on a white background."""
    if top.shape != bottom.shape:
        raise ValueError(f"rows differ: {tuple(top.shape)} vs {tuple(bottom.shape)}")
    batch, _, height, width = top.shape
    out = torch.ones(3, 2 * height + gap, batch * width + (batch - 1) * gap)
    for column in range(batch):
        x = column * (width + gap)
        out[:, :height, x : x + width] = top[column].float().cpu()
        out[:, height + gap :, x : x + width] = bottom[column].float().cpu()
    return out


def mel_to_waveform(log_mel: Tensor, filters: np.ndarray, iterations: int = 32) -> np.ndarray:
    """Whisper log-mel Float[n_mels, F] -> float32 waveform at 16 kHz (Griffin-Lim).

    ``filters``: the feature extractor's mel filterbank, (n_fft / 2 + 1, n_mels).
    """
    power_mel = torch.pow(10.0, log_mel.double() * 4 - 4)  # undo (log10 + 4) / 4
    inverse = torch.linalg.pinv(torch.from_numpy(np.asarray(filters, dtype=np.float64)).T)
    magnitude = (inverse @ power_mel).clamp(min=0).sqrt().float()  # (n_fft/2 + 1, F)
    window = torch.hann_window(N_FFT)
    generator = torch.Generator().manual_seed(0)
    angles = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=generator))
    length = magnitude.shape[-1] * HOP_LENGTH
    for _ in range(iterations):
        wave = torch.istft(magnitude * angles, N_FFT, HOP_LENGTH, window=window, length=length)
        spectrum = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, return_complex=True)
        spectrum = spectrum[:, : magnitude.shape[-1]]
        angles = spectrum / spectrum.abs().clamp(min=1e-8)
    wave = torch.istft(magnitude * angles, N_FFT, HOP_LENGTH, window=window, length=length)
    peak = float(wave.abs().max())
    return (wave / peak * 0.9 if peak > 0 else wave).numpy().astype(np.float32)


def wav_bytes(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono float waveform -> 16-bit PCM WAV bytes."""
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
