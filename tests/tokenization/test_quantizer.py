"""Vector quantiser: toy problems with known answers."""

from __future__ import annotations

import torch

from tokenization.quantizer import QuantizerConfig, VectorQuantizer


def clustered(points_per_cluster: int, centres: torch.Tensor, noise: float) -> torch.Tensor:
    data = centres.repeat_interleave(points_per_cluster, 0)
    return data + noise * torch.randn_like(data)


def test_straight_through_shapes_and_ids() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(codebook_size=16, dim=8))
    z = torch.randn(2, 5, 8, requires_grad=True)
    out = vq(z)
    assert out.quantized.shape == (2, 5, 8) and out.ids.shape == (2, 5)
    assert out.ids.min() >= 0 and out.ids.max() < 16
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through
    vq.eval()
    assert torch.allclose(vq.ids_to_vectors(vq(z).ids), vq(z).quantized)


def test_ema_codebook_finds_well_separated_clusters() -> None:
    torch.manual_seed(0)
    centres = torch.eye(4) * 5
    vq = VectorQuantizer(QuantizerConfig(codebook_size=8, dim=4, ema_decay=0.9))
    for _ in range(60):
        out = vq(clustered(64, centres, 0.05).unsqueeze(0))
    vq.eval()
    points = clustered(10, centres, 0.05).unsqueeze(0)
    result = vq(points)
    per_cluster = [set(row.tolist()) for row in result.ids.reshape(4, 10)]
    for i in range(4):  # a cluster may use two codes, but never one of another cluster
        for j in range(i + 1, 4):
            assert not per_cluster[i] & per_cluster[j]
    assert (result.quantized - points).pow(2).mean() < 0.01  # codes sit on the clusters
    assert out.loss.item() < 0.01


def test_dead_codes_are_restarted_so_usage_does_not_collapse() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(codebook_size=32, dim=4, dead_code_threshold=0.5))
    data = torch.randn(1, 512, 4)
    vq(data)
    vq.codebook[0, :16] = 100.0  # half the codes now sit far from all data
    vq.embed_sum[0, :16] = 100.0
    for _ in range(100):
        out = vq(torch.randn(1, 512, 4))
    assert out.usage > 0.6, out.usage


def test_multi_codebook_ids_and_vectors() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(codebook_size=10, dim=6, num_codebooks=3))
    vq(torch.randn(4, 7, 6))
    vq.eval()
    z = torch.randn(2, 5, 6)
    out = vq(z)
    assert out.ids.shape == (2, 15) and vq.vocab_size == 30 and vq.tokens_per_vector == 3
    grouped = out.ids.reshape(2, 5, 3)
    for k in range(3):  # sub-codebook k owns ids [10k, 10k + 10)
        assert ((grouped[..., k] >= 10 * k) & (grouped[..., k] < 10 * (k + 1))).all()
    assert vq.codebook_vectors().shape == (30, 2)
    assert torch.allclose(vq.ids_to_vectors(out.ids), out.quantized)


def test_learnable_codebook_gets_gradients() -> None:
    vq = VectorQuantizer(QuantizerConfig(codebook_size=4, dim=2, ema_decay=0))
    out = vq(torch.randn(1, 16, 2))
    out.loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
