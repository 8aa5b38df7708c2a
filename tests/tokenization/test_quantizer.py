"""Vector quantiser: toy problems with known answers."""

from __future__ import annotations

import pytest
import torch

import tokenization.quantizer as quantizer_module
from tokenization.quantizer import (
    QuantizerConfig,
    VectorQuantizer,
    kmeans,
    principal_directions,
    ridge_regression,
)


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


def test_kmeans_puts_one_centre_on_each_cluster_and_counts_them() -> None:
    torch.manual_seed(0)
    centres = torch.eye(5) * 10
    points = clustered(30, centres, 0.1)
    found, sizes = kmeans(points, 5, generator=torch.Generator().manual_seed(0), restarts=2)
    assert torch.cdist(found, centres).min(0).values.max() < 0.2  # every cluster has a centre
    assert sorted(sizes.tolist()) == [30.0] * 5


def test_kmeans_fits_a_capped_subset_but_counts_every_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    centres = torch.eye(5) * 10
    points = clustered(400, centres, 0.1)  # 2,000 points, cap 5 x 8 = 40
    fitted: list[int] = []
    lloyd = quantizer_module._lloyd
    monkeypatch.setattr(
        quantizer_module, "_lloyd", lambda fit, *a: fitted.append(len(fit)) or lloyd(fit, *a)
    )
    generator = torch.Generator().manual_seed(0)
    found, sizes = kmeans(points, 5, generator=generator, points_per_cluster=8)
    assert fitted == [40]
    assert torch.cdist(found, centres).min(0).values.max() < 0.5
    assert sorted(sizes.tolist()) == [400.0] * 5


def test_kmeans_with_more_clusters_than_points_repeats_points() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    found, sizes = kmeans(points, 4)
    assert torch.cdist(found, points).min(-1).values.max() == 0 and sizes.sum() == 2


def test_principal_directions_are_orthonormal_and_span_the_data() -> None:
    torch.manual_seed(0)
    plane = torch.randn(200, 2) @ torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    basis = principal_directions(plane, 3)
    assert torch.allclose(basis[:2] @ basis[:2].T, torch.eye(2), atol=1e-5)
    assert basis[0, 0].abs() > 0.99  # the direction of largest variance first
    assert torch.allclose(plane @ basis[:2].T @ basis[:2], plane, atol=1e-4)


def test_ridge_regression_recovers_a_linear_map_and_picks_a_small_penalty() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(400, 6), torch.randn(6, 3)
    y = x @ w + 0.01 * torch.randn(400, 3)
    for power in (1, 2):
        fitted, penalty = ridge_regression(x, y, torch.arange(400) % 20, power=power)
        assert torch.allclose(fitted, w, atol=0.02) and penalty <= 3e-3


def test_initialise_from_seeds_the_codebook_with_kmeans_and_quantises_exactly() -> None:
    torch.manual_seed(0)
    centres = torch.randn(8, 4) * 5
    vq = VectorQuantizer(QuantizerConfig(codebook_size=8, dim=4, ema_decay=0.9))
    vq.initialise_from(clustered(20, centres, 0.0), torch.Generator().manual_seed(0))
    vq.train()  # an initialised quantiser no longer seeds itself from its first batch
    out = vq(centres.unsqueeze(0))
    assert torch.allclose(out.quantized, centres.unsqueeze(0), atol=1e-4)
    assert len(set(out.ids.flatten().tolist())) == 8


@pytest.mark.parametrize("restarts", [1, 3])
def test_initialise_from_runs_the_configured_number_of_kmeans_restarts(
    monkeypatch: pytest.MonkeyPatch, restarts: int
) -> None:
    """``init_restarts`` is the seeding's cost knob (most of a short warm-up's time)."""
    runs: list[int] = []
    lloyd = quantizer_module._lloyd
    monkeypatch.setattr(
        quantizer_module, "_lloyd", lambda fit, *a: runs.append(len(fit)) or lloyd(fit, *a)
    )
    config = QuantizerConfig(codebook_size=8, dim=4, ema_decay=0.9, init_restarts=restarts)
    VectorQuantizer(config).initialise_from(
        clustered(20, torch.randn(8, 4) * 5, 0.1), torch.Generator().manual_seed(0)
    )
    assert len(runs) == restarts
