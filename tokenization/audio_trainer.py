"""Warm-up of the audio tokenizer: ``L = w_R * L_R + L_VQ + w_cap * L_cap`` (NExT-OMNI).

- ``L_R``: L1 between the decoded and the input log-mel over each clip's valid frames;
- ``L_VQ``: the quantiser's commitment (and codebook) term, see ``tokenization.quantizer``;
- ``L_cap``: the Whisper-style token-level caption alignment: a small transformer decoder
  cross-attends to the quantized features (B, T, dim) and predicts the transcript's BPE ids
  with teacher forcing, ``-sum_j log p(y_j | y_<j, z_q)`` averaged over tokens. It pulls the
  codes towards what is said, while ``L_R`` keeps the details needed to redraw the mel.

The caption decoder only exists for this loss: it is not part of the saved tokenizer.

Training clips are augmented (:func:`augment_mels`): with a dozen clips the codebook and
decoder otherwise memorise their spans (held-out mel-L1 rose while train fell). The learning
rate warms up, then follows a cosine over the warm-up's budget
(:func:`tokenization.image_trainer.lr_scale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenization.audio import AudioTokenizer, pad_mels
from tokenization.config import AudioTrainerConfig
from tokenization.image_trainer import lr_scale


def sinusoids(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Transformer sinusoidal positions (Vaswani et al. 2017): (length, dim)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def augment_mels(mels: list[torch.Tensor], config: AudioTrainerConfig) -> list[torch.Tensor]:
    """Random perturbations of log-mels ``[(n_mels, F_i), ...]`` that keep them speech-like:
    a time offset (new token boundaries), a gain, a small shift along the mel axis (edge bins
    repeated) and a change of speed (linear resampling in time). At least one frame is kept."""
    out = []
    for mel in mels:
        if config.max_stretch:
            factor = 1 + config.max_stretch * (2 * float(torch.rand(())) - 1)
            frames = max(1, round(mel.shape[-1] * factor))
            mel = F.interpolate(mel[None], size=frames, mode="linear", align_corners=False)[0]
        if config.max_shift:
            start = int(torch.randint(0, config.max_shift + 1, ()))
            mel = mel[:, min(start, mel.shape[-1] - 1) :]
        if config.max_bin_shift:
            bins = int(torch.randint(-config.max_bin_shift, config.max_bin_shift + 1, ()))
            if bins > 0:
                mel = torch.cat([mel[:1].expand(bins, -1), mel[:-bins]])
            elif bins < 0:
                mel = torch.cat([mel[-bins:], mel[-1:].expand(-bins, -1)])
        if config.max_gain:
            mel = mel + config.max_gain * (2 * float(torch.rand(())) - 1)
        out.append(mel)
    return out


def masked_mel_l1(a: torch.Tensor, b: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean |a - b| over mel bins and valid frames: (B, n_mels, F) x2, (B,) -> scalar."""
    valid = torch.arange(a.shape[-1], device=a.device) < lengths.to(a.device)[:, None]
    valid = valid.unsqueeze(1).expand_as(a)
    return (a - b).abs()[valid].mean()


@torch.no_grad()
def mel_l1(a: torch.Tensor, b: torch.Tensor, lengths: torch.Tensor) -> float:
    """:func:`masked_mel_l1` as a number, for evaluation."""
    return float(masked_mel_l1(a, b, lengths))


class CaptionDecoder(nn.Module):
    """Causal transformer decoder over text ids, cross-attending to quantized audio features.

    Ids ``[0, V)`` are the transcript's, ``V`` is BOS (input only) and the head predicts
    ``[0, V]`` where ``V`` stands for EOS. Positions are sinusoidal on both sides, so
    neither transcripts nor clips have a length limit.
    """

    def __init__(self, feature_dim: int, config: AudioTrainerConfig) -> None:
        super().__init__()
        self.vocab = config.text_vocab_size
        self.memory = nn.Linear(feature_dim, config.caption_dim)
        self.embed = nn.Embedding(self.vocab + 1, config.caption_dim)
        layer = nn.TransformerDecoderLayer(
            config.caption_dim,
            config.caption_heads,
            4 * config.caption_dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerDecoder(layer, config.caption_layers)
        self.norm = nn.LayerNorm(config.caption_dim)
        self.head = nn.Linear(config.caption_dim, self.vocab + 1)

    def forward(
        self, features: torch.Tensor, token_lengths: torch.Tensor, transcripts: list[list[int]]
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy: features (B, T, dim), lengths (B,) -> scalar."""
        if len(transcripts) != features.shape[0]:
            raise ValueError(f"{len(transcripts)} transcripts for {features.shape[0]} clips")
        if any(not 0 <= i < self.vocab for ids in transcripts for i in ids):
            raise ValueError(f"transcript ids must be in [0, {self.vocab})")
        device, eos = features.device, self.vocab
        longest = max(len(ids) for ids in transcripts) + 1
        inputs = torch.full((len(transcripts), longest), eos, dtype=torch.long)
        targets = torch.full_like(inputs, -100)  # ignored by cross_entropy
        for row, ids in enumerate(transcripts):
            inputs[row, : len(ids) + 1] = torch.tensor([self.vocab, *ids])  # BOS = V
            targets[row, : len(ids) + 1] = torch.tensor([*ids, eos])
        inputs, targets = inputs.to(device), targets.to(device)
        dim = self.embed.embedding_dim
        memory = self.memory(features) + sinusoids(features.shape[1], dim, device)
        text = self.embed(inputs) + sinusoids(longest, dim, device)
        causal = torch.triu(torch.ones(longest, longest, dtype=torch.bool, device=device), 1)
        padding = torch.arange(features.shape[1], device=device) >= token_lengths[:, None]
        hidden = self.layers(text, memory, tgt_mask=causal, memory_key_padding_mask=padding)
        logits = self.head(self.norm(hidden))  # (B, L, V + 1)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class AudioTokenizerTrainer:
    """One optimiser over the tokenizer and the caption decoder; :meth:`step` is one update."""

    def __init__(self, tokenizer: AudioTokenizer, config: AudioTrainerConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.caption = CaptionDecoder(tokenizer.config.quantizer.dim, config).to(tokenizer.device)
        caption_lr = config.caption_learning_rate or config.learning_rate
        groups = [
            {"params": [p for p in tokenizer.parameters() if p.requires_grad],
             "base_lr": config.learning_rate},
            {"params": list(self.caption.parameters()), "base_lr": caption_lr},
        ]  # fmt: skip
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.global_step = 0

    def step(
        self,
        mels: torch.Tensor,
        lengths: torch.Tensor,
        transcript_ids: list[list[int]] | None = None,
        progress: float = 0.0,
    ) -> dict[str, float]:
        """One update on log-mels (B, n_mels, F) with valid lengths (B,), augmented here;
        ``progress`` is the share of the training budget spent (learning-rate schedule).

        Returns ``loss``, ``reconstruction`` (L_R), ``vq`` (L_VQ), ``caption`` (L_cap, only
        with transcripts), ``usage`` (fraction of codes used in the batch), ``perplexity``
        and ``lr``.
        """
        config = self.config
        self.tokenizer.train()
        self.caption.train()
        clips = [mel[:, : int(n)] for mel, n in zip(mels, lengths, strict=True)]
        mels, lengths = pad_mels(augment_mels(clips, config))
        mels, lengths = mels.to(self.tokenizer.device), lengths.to(self.tokenizer.device)
        scale = lr_scale(self.global_step, progress, config.warmup_steps, config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        lr = config.learning_rate * scale
        reconstructed, vq, features, token_lengths = self.tokenizer(mels, lengths)
        reconstruction = masked_mel_l1(reconstructed, mels, lengths)
        loss = config.reconstruction_weight * reconstruction + vq.loss
        metrics = {"reconstruction": reconstruction.item(), "vq": vq.loss.item()}
        if transcript_ids is not None:
            caption = self.caption(features, token_lengths, transcript_ids)
            loss = loss + config.caption_weight * caption
            metrics["caption"] = caption.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        self.optimizer.step()
        self.global_step += 1
        return {
            "loss": loss.item(),
            **metrics,
            "usage": vq.usage,
            "perplexity": float(vq.perplexity),
            "lr": lr,
        }
