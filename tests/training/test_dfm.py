"""Discrete flow matching math against known answers: marginals, losses, velocities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import training.dfm.metric_path as metric_module
from infra.config import ConfigError, validate
from tokenization.vocab import VocabLayout
from training.dfm import (
    CosineScheduler,
    MaskedPath,
    MetricPath,
    MetricScheduler,
    PathConfig,
    PolynomialScheduler,
    UniformPath,
    VocabGroups,
    build_path,
    cross_entropy_sum,
    generalized_kl_sum,
)

LAYOUT = VocabLayout(text_size=21, image_size=16, audio_size=8)  # text group: 21 + 11 = 32
GROUPS = VocabGroups.from_layout(LAYOUT)
MASK = LAYOUT.special_id("<MASK>")


def make_vectors(seed: int = 0, dim: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randn(GROUPS.size[g], dim, generator=gen) * 3 for g in GROUPS.names}


def metric_path(max_elements: int = 1 << 20) -> MetricPath:
    return MetricPath(MetricScheduler(), GROUPS, make_vectors(), max_elements=max_elements)


def clean_ids(rows: int, length: int, group: str | None, seed: int) -> torch.Tensor:
    """Random unified ids of one group (or of any group, never <MASK>), Long[rows, length]."""
    gen = torch.Generator().manual_seed(seed)
    if group is not None:
        local = torch.randint(0, GROUPS.size[group], (rows, length), generator=gen)
        return local + GROUPS.start[group]
    ids = torch.randint(0, LAYOUT.size - 1, (rows, length), generator=gen)
    return ids + (ids >= MASK).long()  # skip <MASK>: it is never a clean token


def reference_p_t(vectors: torch.Tensor, x1: int, beta: float) -> torch.Tensor:
    """p_t(. | x1) written independently: softmax(-beta ||u_x - u_x1||^4) of unit vectors."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    dist = (unit - unit[x1]).norm(dim=-1) ** 4
    return torch.softmax(-beta * dist.double(), dim=0)


# --- groups and schedulers ---------------------------------------------------------------


def test_groups_partition_the_unified_vocabulary() -> None:
    assert GROUPS.names == ("text", "image", "audio")
    assert GROUPS.size == {"text": 32, "image": 16, "audio": 8} and GROUPS.total == LAYOUT.size
    group = GROUPS.group_of(torch.arange(LAYOUT.size))
    assert torch.bincount(group).tolist() == [32, 16, 8]
    assert group[MASK] == 0 and group[LAYOUT.special_id("<EOS>")] == 0
    assert group[LAYOUT.offsets["image"]] == 1 and group[LAYOUT.offsets["audio"] - 1] == 1
    assert group[LAYOUT.offsets["audio"]] == 2 and group[-1] == 2
    assert GROUPS.starts_of(group).tolist() == [0] * 32 + [32] * 16 + [48] * 8


@pytest.mark.parametrize(
    "scheduler", [PolynomialScheduler(1.0), PolynomialScheduler(2.0), CosineScheduler()]
)
def test_kappa_schedules_run_from_zero_to_one_with_their_derivative(scheduler) -> None:
    assert scheduler.kappa(torch.tensor(0.0)) == 0
    assert torch.isclose(scheduler.kappa(torch.tensor(1.0)), torch.tensor(1.0))
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    numeric = (scheduler.kappa(t + 1e-3) - scheduler.kappa(t - 1e-3)) / 2e-3
    assert torch.allclose(scheduler.d_kappa(t), numeric, atol=1e-3)
    assert torch.isfinite(scheduler.jump_rate(torch.tensor([0.0, 1.0]))).all()


def test_polynomial_and_cosine_have_their_closed_forms() -> None:
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(PolynomialScheduler(2.0).kappa(t), t**2)
    assert torch.allclose(CosineScheduler().kappa(t), 1 - torch.cos(math.pi * t / 2))
    with pytest.raises(ValueError):
        PolynomialScheduler(0.0)


def test_metric_schedule_is_fudokis_and_finite_at_the_ends() -> None:
    sched = MetricScheduler(c=3.0, a=0.9)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75])
    assert torch.allclose(sched.beta(t), 3 * (t / (1 - t)) ** 0.9)
    inner = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    numeric = (sched.beta(inner + 1e-4) - sched.beta(inner - 1e-4)) / 2e-4
    assert torch.allclose(sched.d_beta(inner), numeric.float(), rtol=1e-3)
    ends = torch.tensor([0.0, 1.0])
    assert torch.isfinite(sched.beta(ends)).all() and torch.isfinite(sched.d_beta(ends)).all()
    assert sched.beta(torch.tensor(1.0)) > 1e3


# --- path marginals ------------------------------------------------------------------------


def response_mask_for(x1: torch.Tensor, instruction: int) -> torch.Tensor:
    mask = torch.ones_like(x1, dtype=torch.bool)
    mask[:, :instruction] = False
    return mask


def bound(p: float, n: int) -> float:
    """Five standard errors of a Bernoulli(p) mean over n draws (plus float slack)."""
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize("scheduler", [PolynomialScheduler(2.0), CosineScheduler()])
def test_masked_path_keeps_kappa_t_clean_and_masks_the_rest(scheduler) -> None:
    path = MaskedPath(scheduler, GROUPS, MASK)
    x1 = clean_ids(300, 64, None, seed=1)
    mask = response_mask_for(x1, instruction=8)
    times = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0]).repeat_interleave(60)
    xt = path.sample(x1, times, mask, generator=torch.Generator().manual_seed(2))
    assert torch.equal(xt[~mask], x1[~mask])
    assert ((xt == x1) | (xt == MASK))[mask].all()
    assert torch.equal(path.loss_mask(xt, x1, mask), mask & (xt == MASK))
    for value in times.unique():
        rows = times == value
        clean = (xt[rows] == x1[rows])[mask[rows]].float()
        kappa = float(scheduler.kappa(value))
        assert abs(clean.mean().item() - kappa) <= bound(kappa, clean.numel())


def test_uniform_path_clean_fraction_counts_drawing_x1_itself() -> None:
    scheduler = PolynomialScheduler(1.0)
    path = UniformPath(scheduler, GROUPS)
    gen = torch.Generator().manual_seed(3)
    for group in ("audio", "image", "text"):
        x1 = clean_ids(200, 50, group, seed=4)
        mask = response_mask_for(x1, instruction=5)
        t = torch.full((200,), 0.4)
        xt = path.sample(x1, t, mask, generator=gen)
        assert torch.equal(xt[~mask], x1[~mask])
        assert torch.equal(GROUPS.group_of(xt), GROUPS.group_of(x1))  # noise stays in the group
        expected = 0.4 + 0.6 / GROUPS.size[group]
        clean = (xt == x1)[mask].float()
        assert abs(clean.mean().item() - expected) <= bound(expected, clean.numel())
        assert torch.equal(path.loss_mask(xt, x1, mask), mask)


def test_uniform_source_covers_the_group_evenly() -> None:
    path = UniformPath(PolynomialScheduler(1.0), GROUPS)
    x1 = clean_ids(400, 40, "image", seed=5)
    xt = path.sample(
        x1,
        torch.zeros(400),
        torch.ones_like(x1, dtype=torch.bool),
        generator=torch.Generator().manual_seed(6),
    )
    counts = torch.bincount(xt.flatten() - GROUPS.start["image"], minlength=16).float()
    expected = x1.numel() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5


def test_metric_path_goes_from_uniform_to_clean_monotonically() -> None:
    path = metric_path()
    x1 = clean_ids(100, 40, "image", seed=7)
    mask = response_mask_for(x1, instruction=4)
    fractions = []
    gen = torch.Generator().manual_seed(8)
    for value in (0.0, 0.3, 0.5, 0.7, 0.9, 0.999):
        xt = path.sample(x1, torch.full((100,), value), mask, generator=gen)
        assert torch.equal(xt[~mask], x1[~mask])
        assert torch.equal(GROUPS.group_of(xt), GROUPS.group_of(x1))
        fractions.append((xt == x1)[mask].float().mean().item())
    n = int(mask.sum())
    assert abs(fractions[0] - 1 / 16) <= bound(1 / 16, n)
    assert fractions[-1] > 0.99
    assert all(a < b for a, b in zip(fractions, fractions[1:], strict=False))


def test_metric_path_samples_follow_the_softmax_of_distances() -> None:
    vectors = make_vectors()["audio"]
    path = metric_path()
    token = 3
    x1 = torch.full((4000, 1), GROUPS.start["audio"] + token)
    xt = path.sample(
        x1,
        torch.full((4000,), 0.5),
        torch.ones_like(x1, dtype=torch.bool),
        generator=torch.Generator().manual_seed(9),
    )
    empirical = torch.bincount(xt.flatten() - GROUPS.start["audio"], minlength=8).double() / 4000
    expected = reference_p_t(vectors, token, float(MetricScheduler().beta(torch.tensor(0.5))))
    assert 0.05 < expected[token] < 0.95  # a non-trivial distribution at t = 0.5
    assert (empirical - expected).abs().sum() / 2 < 0.03  # total variation


def test_metric_path_chunks_positions_without_changing_the_draw(monkeypatch) -> None:
    x1 = torch.cat([clean_ids(6, 30, g, seed=10) for g in GROUPS.names], dim=1)
    mask = response_mask_for(x1, instruction=3)
    t = torch.linspace(0.1, 0.9, 6)
    whole = metric_path(max_elements=1 << 20).sample(x1, t, mask, torch.Generator().manual_seed(11))
    largest: list[int] = []
    original = metric_module.metric_distance

    def recording(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = original(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(metric_module, "metric_distance", recording)
    chunked = metric_path(max_elements=64).sample(x1, t, mask, torch.Generator().manual_seed(11))
    assert torch.equal(chunked, whole)
    assert len(largest) > 3 and max(largest) <= 64


# --- losses --------------------------------------------------------------------------------


def test_cross_entropy_is_zero_for_an_oracle_and_log_v_for_uniform_logits() -> None:
    targets = torch.randint(0, 16, (50,), generator=torch.Generator().manual_seed(12))
    oracle = 50.0 * F.one_hot(targets, 16).float()
    assert cross_entropy_sum(oracle, targets).item() < 1e-6 * 50
    uniform = torch.zeros(50, 16, dtype=torch.bfloat16)
    assert math.isclose(cross_entropy_sum(uniform, targets).item(), 50 * math.log(16), rel_tol=1e-5)


def test_generalized_kl_is_nonnegative_and_zero_for_an_oracle() -> None:
    gen = torch.Generator().manual_seed(13)
    scheduler = PolynomialScheduler(1.0)
    targets = torch.randint(0, 16, (400,), generator=gen)
    xt = torch.randint(-1, 16, (400,), generator=gen)  # -1: <MASK>
    xt[:100] = targets[:100]
    t = torch.rand(400, generator=gen)
    logits = torch.randn(400, 16, generator=gen) * 3
    each = [
        generalized_kl_sum(
            logits[i : i + 1], targets[i : i + 1], xt[i : i + 1], t[i : i + 1], scheduler
        )
        for i in range(400)
    ]
    assert min(v.item() for v in each) >= 0
    assert torch.isclose(sum(each), generalized_kl_sum(logits, targets, xt, t, scheduler))
    oracle = 60.0 * F.one_hot(targets, 16).float()
    assert generalized_kl_sum(oracle, targets, xt, t, scheduler).item() < 1e-6


def test_generalized_kl_on_masked_positions_is_the_weighted_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(14)
    logits, targets = torch.randn(30, 16, generator=gen), torch.randint(0, 16, (30,), generator=gen)
    scheduler, t = CosineScheduler(), torch.full((30,), 0.3)
    masked = torch.full((30,), -1)
    expected = scheduler.jump_rate(torch.tensor(0.3)) * cross_entropy_sum(logits, targets)
    assert torch.isclose(generalized_kl_sum(logits, targets, masked, t, scheduler), expected)


# --- Euler steps ---------------------------------------------------------------------------


def drive(path, x1: torch.Tensor, steps: int, until: float = 1.0, seed: int = 15) -> torch.Tensor:
    """Start from the source (t = 0) and take Euler steps with the true x1 up to ``until``."""
    gen = torch.Generator().manual_seed(seed)
    flat = x1.flatten()
    xt = path.sample(x1, torch.zeros(len(x1)), torch.ones_like(x1, dtype=torch.bool), gen).flatten()
    h = 1.0 / steps
    for i in range(round(until * steps)):
        xt = path.euler_step(xt, flat, torch.tensor(i * h), h, generator=gen)
    return xt


@pytest.mark.parametrize("name", ["masked_poly2", "masked_cos", "uniform", "metric"])
def test_euler_steps_with_the_true_x1_reach_it_at_t_one(name: str) -> None:
    path = {
        "masked_poly2": MaskedPath(PolynomialScheduler(2.0), GROUPS, MASK),
        "masked_cos": MaskedPath(CosineScheduler(), GROUPS, MASK),
        "uniform": UniformPath(PolynomialScheduler(1.0), GROUPS),
        "metric": metric_path(),
    }[name]
    x1 = torch.cat([clean_ids(20, 20, g, seed=16) for g in GROUPS.names], dim=1)
    assert torch.equal(drive(path, x1, steps=16), x1.flatten())
    assert torch.equal(drive(path, x1, steps=1), x1.flatten())  # one step of h = 1


@pytest.mark.parametrize(
    "path",
    [MaskedPath(PolynomialScheduler(2.0), GROUPS, MASK), UniformPath(CosineScheduler(), GROUPS)],
)
def test_euler_steps_follow_the_path_marginal(path) -> None:
    x1 = clean_ids(200, 50, "audio", seed=17)
    halfway = drive(path, x1, steps=10, until=0.5)
    kappa = float(path.scheduler.kappa(torch.tensor(0.5)))
    expected = kappa if isinstance(path, MaskedPath) else kappa + (1 - kappa) / 8
    clean = (halfway == x1.flatten()).float()
    assert abs(clean.mean().item() - expected) <= bound(expected, clean.numel())


def test_metric_euler_steps_track_the_metric_path() -> None:
    path = metric_path()
    x1 = clean_ids(200, 50, "image", seed=18)
    gen = torch.Generator().manual_seed(19)
    stepped = drive(path, x1, steps=40, until=0.5)
    direct = path.sample(x1, torch.full((200,), 0.5), torch.ones_like(x1, dtype=torch.bool), gen)
    stepped_clean = (stepped == x1.flatten()).float().mean().item()
    direct_clean = (direct == x1).float().mean().item()
    assert 0.1 < direct_clean < 0.9
    assert abs(stepped_clean - direct_clean) < 0.05


# --- velocities ----------------------------------------------------------------------------


def random_posterior(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=gen) * 2, dim=-1)


def assert_rate_matrix(u: torch.Tensor, current: torch.Tensor) -> None:
    assert torch.allclose(u.sum(-1), torch.zeros(len(u)), atol=1e-4)
    off = u.scatter(-1, current.unsqueeze(-1), 0.0)
    assert (off >= 0).all()


def test_uniform_velocity_is_a_rate_matrix_with_the_mixture_formula() -> None:
    path = UniformPath(PolynomialScheduler(1.0), GROUPS)
    posterior = random_posterior(40, 16, seed=20)
    xt = torch.randint(0, 16, (40,), generator=torch.Generator().manual_seed(21))
    u = path.velocity(posterior, xt, torch.tensor(0.25), "image")
    assert_rate_matrix(u, xt)
    expected = (1 / 0.75) * (posterior - F.one_hot(xt, 16))
    assert torch.allclose(u, expected, atol=1e-5)


def test_masked_velocity_leaves_mask_only_and_never_moves_clean_tokens() -> None:
    path = MaskedPath(PolynomialScheduler(1.0), GROUPS, MASK)
    posterior = random_posterior(40, 32, seed=22)
    xt_unified = torch.where(torch.arange(40) % 2 == 0, MASK, torch.arange(40) % 21)
    xt = path.local_state(xt_unified, "text")
    assert (xt[::2] == -1).all() and (xt[1::2] >= 0).all()
    u = path.velocity(posterior, xt, torch.tensor(0.5), "text")
    assert u.shape == (40, 33)
    assert_rate_matrix(u, torch.where(xt < 0, 32, xt))
    assert (u[1::2] == 0).all()
    assert (u[::2, MASK] == 0).all()  # never "jumps" to the <MASK> id of the text head
    renormalised = posterior[::2].index_fill(-1, torch.tensor([MASK]), 0.0)
    renormalised = renormalised / renormalised.sum(-1, keepdim=True)
    assert torch.allclose(u[::2, :32], 2.0 * renormalised, atol=1e-5)
    assert torch.allclose(u[::2, 32], torch.full((20,), -2.0))


def test_metric_velocity_is_a_rate_matrix_independent_of_chunking() -> None:
    posterior = random_posterior(12, 16, seed=23)
    xt = torch.randint(0, 16, (12,), generator=torch.Generator().manual_seed(24))
    t = torch.linspace(0.1, 0.9, 12)
    whole = metric_path(1 << 20).velocity(posterior, xt, t, "image")
    chunked = metric_path(40).velocity(posterior, xt, t, "image")  # x1 blocks of 2, one row
    assert_rate_matrix(whole, xt)
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-5)


def test_conditional_velocities_generate_their_paths() -> None:
    """Kolmogorov forward equation: sum_z p_t(z|x1) u_t(x|z,x1) = d/dt p_t(x|x1)."""
    t, x1, vocab = 0.4, 5, 16
    everyone = torch.arange(vocab)
    delta = F.one_hot(torch.full((vocab,), x1), vocab).float()  # posterior = delta_{x1}

    sched = MetricScheduler()
    vectors = make_vectors()["image"]
    u = metric_path().velocity(delta, everyone, torch.tensor(t), "image")  # row z: u(.|z, x1)
    p_t = reference_p_t(vectors, x1, float(sched.beta(torch.tensor(t))))
    eps = 1e-4
    ahead = reference_p_t(vectors, x1, float(sched.beta(torch.tensor(t + eps))))
    behind = reference_p_t(vectors, x1, float(sched.beta(torch.tensor(t - eps))))
    dp_dt = (ahead - behind) / (2 * eps)
    assert dp_dt.abs().max() > 0.05
    assert torch.allclose(p_t.float() @ u, dp_dt.float(), atol=2e-3)

    mixture = UniformPath(CosineScheduler(), GROUPS)
    u = mixture.velocity(delta, everyone, torch.tensor(t), "image")
    kappa = float(CosineScheduler().kappa(torch.tensor(t)))
    d_kappa = float(CosineScheduler().d_kappa(torch.tensor(t)))
    p_t = kappa * delta[0] + (1 - kappa) / vocab
    assert torch.allclose(p_t @ u, d_kappa * (delta[0] - 1 / vocab), atol=1e-5)


# --- config --------------------------------------------------------------------------------


def test_build_path_from_config() -> None:
    masked = build_path(PathConfig(), LAYOUT)
    assert isinstance(masked, MaskedPath) and masked.mask_id == MASK
    uniform = build_path(PathConfig(path="uniform", scheduler="cosine"), LAYOUT)
    assert isinstance(uniform, UniformPath) and isinstance(uniform.scheduler, CosineScheduler)
    cfg = validate(PathConfig, {"path": "metric", "scheduler": "metric", "c": 2.0, "a": 1.0})
    metric = build_path(cfg, LAYOUT, make_vectors())
    assert isinstance(metric, MetricPath) and metric.scheduler.c == 2.0
    with pytest.raises(ValueError, match="needs vectors"):
        build_path(cfg, LAYOUT)


REFUSED_CONFIGS = [
    {"path": "metric"},
    {"scheduler": "metric"},
    {"path": "metric", "scheduler": "metric", "loss": "generalized_kl"},
    {"path": "uniform", "exponent": 0},
]


@pytest.mark.parametrize("data", REFUSED_CONFIGS)
def test_inconsistent_path_configs_are_refused(data: dict) -> None:
    with pytest.raises(ConfigError):
        validate(PathConfig, data)


def test_metric_path_refuses_vectors_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="image"):
        MetricPath(MetricScheduler(), GROUPS, {"image": torch.randn(15, 4)})
    path = MetricPath(MetricScheduler(), GROUPS, {"image": torch.randn(16, 4)})
    x1 = clean_ids(2, 4, "audio", seed=25)
    with pytest.raises(KeyError, match="audio"):
        path.sample(x1, torch.full((2,), 0.5), torch.ones_like(x1, dtype=torch.bool))
