"""Samplers, dynamic length and canvases against oracle predictors with known answers; the
adaptive cache and any-to-any generation on the tiny OmniModel."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import Tensor

from infra.config import ConfigError, validate
from tokenization.sequences import MEDIA_MARKERS
from tokenization.vocab import VocabLayout
from training.caches import ResponseCache
from training.config import CacheConfig
from training.dfm import MaskedPath, MetricPath, MetricScheduler, PolynomialScheduler, UniformPath
from training.generation import (
    choose_lengths,
    generate,
    media_canvas,
    pad_response_to_block,
    sample_response,
    text_canvas,
)
from training.model import OmniModel
from training.model_config import load_model_config
from training.model_predictor import ModelPredictor
from training.sampling import (
    FIXED,
    Canvas,
    SamplerConfig,
    Vocabulary,
    commit_positions,
    confidence_unmask,
    euler_sample,
    prior_sample,
)

LAYOUT = VocabLayout(text_size=20, image_size=16, audio_size=12)
VOCAB = Vocabulary.from_layout(LAYOUT)
GROUPS = VOCAB.groups
EOS, PAD, MASK = VOCAB.eos_id, VOCAB.pad_id, VOCAB.mask_id
SHARP = 30.0  # logit margin of an oracle: probability ~1 - V e^-30


class OraclePredictor:
    """Puts (almost) all mass on a known ``x1`` (Long[B, R]); records every canvas it sees."""

    def __init__(self, x1: Tensor, confidence: Tensor | None = None) -> None:
        self.x1 = x1
        # Optional Float[B, R] logit margins, to make some positions less confident.
        self.margin = torch.full(x1.shape, SHARP) if confidence is None else confidence
        self.seen: list[Tensor] = []

    def __call__(self, response: Tensor, select: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.seen.append(response.clone())
        out = {}
        for name, where in select.items():
            local = self.x1[where] - GROUPS.start[name]
            assert bool(((local >= 0) & (local < GROUPS.size[name])).all()), "wrong head asked"
            logits = torch.zeros(len(local), GROUPS.size[name])
            logits[torch.arange(len(local)), local] = self.margin[where]
            out[name] = logits
        return out


class FixedDistribution:
    """The same categorical ``probs`` (over text ids) at every position, whatever the canvas."""

    def __init__(self, probs: Tensor) -> None:
        self.logits = probs.log()

    def __call__(self, response: Tensor, select: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.logits.expand(int(where.sum()), -1) for name, where in select.items()}


class KnowsLength:
    """A text model that knows each row's answer: ``content`` ids up to ``length[b]``, then
    ``<EOS>``, then ``<PAD>``; confident wherever the canvas is, whatever its width."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = torch.tensor(lengths)
        self.probes: list[int] = []

    def target(self, width: int) -> Tensor:
        positions = torch.arange(width)[None, :].expand(len(self.lengths), -1)
        content = 3 + positions % 10
        ids = torch.where(positions < self.lengths[:, None], content, PAD)
        return torch.where(positions == self.lengths[:, None], EOS, ids)

    def __call__(self, response: Tensor, select: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.probes.append(response.shape[1])
        return OraclePredictor(self.target(response.shape[1]))(response, select)


def mixed_canvas(batch: int, text: int, image: int) -> Canvas:
    """A canvas with a text part, then <BOI> image <EOI> <EOS> (markers fixed)."""
    words = text_canvas(torch.full((batch,), text), VOCAB)
    picture = media_canvas("image", image, batch, VOCAB)
    return Canvas(
        torch.cat([words.ids, picture.ids], 1), torch.cat([words.group, picture.group], 1)
    )


def clean_target(canvas: Canvas, seed: int = 0) -> Tensor:
    """A random clean x1 for the canvas: free positions drawn within their group (never
    <MASK>), fixed positions as they are."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.tensor([GROUPS.start[n] for n in GROUPS.names])
    sizes = torch.tensor([GROUPS.size[n] for n in GROUPS.names])
    group = canvas.group.clamp(min=0)
    local = (torch.rand(canvas.ids.shape, generator=g) * (sizes[group] - 1)).long()
    x1 = starts[group] + local
    x1 = torch.where(x1 == MASK, MASK + 1, x1)
    return torch.where(canvas.free, x1, canvas.ids)


def paths() -> dict[str, object]:
    vectors = {
        n: torch.randn(GROUPS.size[n], 4, generator=torch.Generator().manual_seed(1))
        for n in GROUPS.names
    }
    return {
        "masked": MaskedPath(PolynomialScheduler(1.0), GROUPS, MASK),
        "uniform": UniformPath(PolynomialScheduler(1.0), GROUPS),
        "metric": MetricPath(MetricScheduler(), GROUPS, vectors),
    }


# --------------------------------------------------------------------------- Euler CTMC


@pytest.mark.parametrize("name", ["masked", "uniform", "metric"])
def test_euler_with_an_oracle_posterior_returns_x1(name: str) -> None:
    path = paths()[name]
    canvas = mixed_canvas(batch=3, text=9, image=6)
    x1 = clean_target(canvas)
    oracle = OraclePredictor(x1)
    g = torch.Generator().manual_seed(0)
    start = prior_sample(path, canvas, VOCAB, g)
    out = euler_sample(oracle, path, start, VOCAB, steps=10, generator=g)
    assert torch.equal(out.ids, x1)
    assert all(torch.equal(seen[~canvas.free], canvas.ids[~canvas.free]) for seen in oracle.seen)
    assert torch.equal(out.group, canvas.group)


@pytest.mark.parametrize("name", ["masked", "uniform"])
def test_euler_follows_the_schedule_on_the_way(name: str) -> None:
    """Mid-way the fraction of positions already at x1 is the path's: kappa_t for the masked
    path, kappa_t + (1 - kappa_t) / V for the uniform one (x1 from a uniform draw too).
    With kappa_t = t the Euler jumps are exact at the grid times: prod (1 - h / (1 - ih))
    = 1 - t."""
    path = paths()[name]
    scheduler = path.scheduler
    batch, width, steps = 8, 250, 8
    canvas = text_canvas(torch.full((batch,), width), VOCAB)
    x1 = clean_target(canvas, seed=3)
    oracle = OraclePredictor(x1)
    g = torch.Generator().manual_seed(4)
    euler_sample(oracle, path, prior_sample(path, canvas, VOCAB, g), VOCAB, steps, generator=g)
    chance = 0.0 if name == "masked" else 1 / GROUPS.size["text"]
    fractions = [float((seen == x1).float().mean()) for seen in oracle.seen]
    for step in (0, 3, 6):
        kappa = float(scheduler.kappa(torch.tensor(step / steps)))
        assert fractions[step] == pytest.approx(kappa + (1 - kappa) * chance, abs=0.03)
    assert fractions == sorted(fractions)  # an oracle's velocity only ever jumps to x1


def test_euler_on_the_masked_path_samples_the_posterior() -> None:
    """A posterior that ignores the canvas is the true one for the masked path, so the
    samples' frequencies match it (x1 is drawn, not the argmax)."""
    probs = torch.full((GROUPS.size["text"],), 1e-9)
    probs[[4, 7, 11]] = torch.tensor([0.5, 0.3, 0.2])
    canvas = text_canvas(torch.full((20,), 200), VOCAB)
    g = torch.Generator().manual_seed(5)
    path = paths()["masked"]
    start = prior_sample(path, canvas, VOCAB, g)
    out = euler_sample(FixedDistribution(probs), path, start, VOCAB, steps=6, generator=g)
    freq = torch.bincount(out.ids.flatten(), minlength=12)[[4, 7, 11]].float() / out.ids.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.02)
    greedy = euler_sample(FixedDistribution(probs), path, start, VOCAB, 6, temperature=0.0)
    assert bool((greedy.ids == 4).all())


def test_prior_of_each_path() -> None:
    canvas = mixed_canvas(batch=4, text=50, image=50)
    g = torch.Generator().manual_seed(0)
    masked = prior_sample(paths()["masked"], canvas, VOCAB, g)
    assert bool((masked.ids[canvas.free] == MASK).all())
    uniform = prior_sample(paths()["uniform"], canvas, VOCAB, g)
    assert torch.equal(uniform.ids[~canvas.free], canvas.ids[~canvas.free])
    image = canvas.group == GROUPS.index("image")
    assert bool((GROUPS.group_of(uniform.ids)[image] == GROUPS.index("image")).all())
    assert len(uniform.ids[image].unique()) > GROUPS.size["image"] // 2  # spread, not one id


# --------------------------------------------------------------------------- confidence unmasking


def test_commit_positions_top_k_per_row() -> None:
    confidence = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.2, 0.3, 0.4, 0.5]])
    masked = torch.tensor([[True, True, False, True], [True, True, True, True]])
    commit = commit_positions(confidence, masked, k=torch.tensor([2, 1]))
    assert commit.tolist() == [[True, False, False, True], [False, False, False, True]]
    everything = commit_positions(confidence, masked, k=torch.tensor([9, 9]))
    assert torch.equal(everything, masked)


def test_commit_positions_threshold_at_least_one() -> None:
    confidence = torch.tensor([[0.95, 0.1, 0.97, 0.99], [0.2, 0.6, 0.4, 0.5], [0.9, 0.9, 0, 0]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    commit = commit_positions(confidence, masked, tau=0.9)
    assert commit.tolist() == [
        [True, False, True, False],  # above tau, the unmasked 0.99 not
        [False, True, False, False],  # none above tau: the most confident one
        [False, False, False, False],  # nothing masked, nothing committed
    ]


def test_commit_positions_threshold_over_a_floor_of_k() -> None:
    confidence = torch.tensor([[0.95, 0.1, 0.97, 0.3], [0.2, 0.6, 0.4, 0.5], [0.9, 0.9, 0, 0]])
    masked = torch.tensor([[True, True, True, True], [True, True, True, True], [False] * 4])
    commit = commit_positions(confidence, masked, k=torch.tensor([1, 2, 2]), tau=0.9)
    assert commit.tolist() == [
        [True, False, True, False],  # the top one, and the other one above tau
        [False, True, False, True],  # none above tau: the two most confident
        [False, False, False, False],  # nothing masked, nothing committed
    ]


def unmasking_run(config: SamplerConfig, margin: Tensor | None = None) -> OraclePredictor:
    canvas = mixed_canvas(batch=2, text=20, image=12)
    x1 = clean_target(canvas, seed=7)
    oracle = OraclePredictor(x1, margin)
    start = prior_sample(paths()["masked"], canvas, VOCAB)
    out = confidence_unmask(oracle, start, VOCAB, config)
    assert torch.equal(out.ids, x1)
    return oracle


def masked_counts(oracle: OraclePredictor) -> list[list[int]]:
    return [(seen == MASK).sum(1).tolist() for seen in oracle.seen]


def test_confidence_unmasking_commits_k_per_step() -> None:
    oracle = unmasking_run(SamplerConfig(tokens_per_step=5, temperature=0))
    assert masked_counts(oracle) == [
        [32, 32],
        [27, 27],
        [22, 22],
        [17, 17],
        [12, 12],
        [7, 7],
        [2, 2],
    ]


def test_confidence_unmasking_spreads_over_the_steps() -> None:
    oracle = unmasking_run(SamplerConfig(steps=3, temperature=0))
    assert masked_counts(oracle) == [[32, 32], [21, 21], [10, 10]]


def test_confidence_unmasking_commits_the_most_confident_first() -> None:
    margin = torch.linspace(1.0, 20.0, 35).expand(2, -1).clone()  # later = more confident
    oracle = unmasking_run(SamplerConfig(tokens_per_step=4, temperature=0), margin)
    free = mixed_canvas(2, 20, 12).free[0]
    committed = (oracle.seen[1][0] != MASK) & free
    assert committed.nonzero().flatten().tolist() == [29, 30, 31, 32]  # the last image ids


def test_confidence_unmasking_threshold() -> None:
    margin = torch.full((2, 35), SHARP)
    margin[:, :3] = 0.5  # three unsure text positions: p ~ 0.05 each
    oracle = unmasking_run(SamplerConfig(tau=0.9, temperature=0), margin)
    # Step 1 commits every sure position; then one unsure position per step (at least one).
    assert masked_counts(oracle) == [[32, 32], [3, 3], [2, 2], [1, 1]]


def test_confidence_unmasking_threshold_over_k_per_step() -> None:
    margin = torch.full((2, 35), SHARP)
    margin[:, :6] = 0.5  # six unsure text positions
    oracle = unmasking_run(SamplerConfig(tokens_per_step=4, tau=0.9, temperature=0), margin)
    # Step 1 commits every sure position; then the unsure ones, four a step.
    assert masked_counts(oracle) == [[32, 32], [6, 6], [2, 2]]


def test_block_decoding_unmasks_blocks_left_to_right() -> None:
    margin = torch.linspace(1.0, 20.0, 35).expand(2, -1).clone()  # later = more confident
    config = SamplerConfig(tokens_per_step=3, temperature=0, decode_block=8)
    oracle = unmasking_run(config, margin)
    free = mixed_canvas(2, 20, 12).free
    for seen in oracle.seen:
        masked = (seen == MASK) & free
        first = int(masked[0].nonzero()[0])
        later = torch.arange(35) >= (first // 8 + 1) * 8
        assert bool((masked | ~free)[:, later].all())  # no later block touched yet
        assert not bool(masked[:, :first].any())
    # 3 per step within each block: 8 | 8 | 4 text + 3 image | 8 | 1 free positions.
    assert [c[0] for c in masked_counts(oracle)] == [32, 29, 26, 24, 21, 18, 16, 13, 10, 9, 6, 3, 1]


def test_block_decoding_spreads_the_steps_over_the_blocks() -> None:
    # 10 steps over 35 positions in blocks of 8: 2 steps per block.
    oracle = unmasking_run(SamplerConfig(steps=10, temperature=0, decode_block=8))
    assert masked_counts(oracle) == [[c, c] for c in (32, 28, 24, 20, 16, 12, 9, 5, 1)]


def test_confidence_unmasking_needs_the_masked_path() -> None:
    config = SamplerConfig(method="confidence")
    oracle = KnowsLength([3])
    with pytest.raises(ValueError, match="masked path"):
        sample_response(oracle, paths()["uniform"], "image", 1, VOCAB, config, media_tokens=4)


# --------------------------------------------------------------------------- dynamic length


def test_dgs_chooses_the_padded_length() -> None:
    """Canvas long enough iff its last position is past the answer's last content token:
    the training length of a response of n tokens + <EOS>, padded to the block."""
    config = SamplerConfig(block_size=32, max_length=128, eos_threshold=0.9)
    answers = [5, 30, 31, 32, 70]
    oracle = KnowsLength([*answers, 400])
    lengths = choose_lengths(oracle, paths()["masked"], 6, VOCAB, config)
    assert lengths.tolist() == [32, 32, 32, 64, 96, 128]  # the last one capped at max_length
    trained = [len(pad_response_to_block(np.zeros(n + 1, np.int32), 0, PAD)) for n in answers]
    assert trained == lengths.tolist()[:5]
    assert oracle.probes == [32, 64, 96, 128]


def test_dgs_stops_probing_once_every_row_fits() -> None:
    oracle = KnowsLength([3, 40])
    config = SamplerConfig(block_size=16, max_length=512)
    assert choose_lengths(oracle, paths()["masked"], 2, VOCAB, config).tolist() == [16, 48]
    assert oracle.probes == [16, 32, 48]


@pytest.mark.parametrize(("method", "name"), [("confidence", "masked"), ("euler", "uniform")])
def test_text_response_is_cut_at_eos(method: str, name: str) -> None:
    oracle = KnowsLength([5, 40, 17])
    config = SamplerConfig(method=method, block_size=16, max_length=64, steps=4, temperature=0)
    rows = sample_response(oracle, paths()[name], "text", 3, VOCAB, config)
    expected = oracle.target(48)
    assert [len(r) for r in rows] == [5, 40, 17]
    for row, target in zip(rows, expected, strict=True):
        assert torch.equal(row, target[: len(row)])


def test_pad_response_to_block() -> None:
    tokens = np.array([1, 2, 3, 9, 9, EOS], dtype=np.int32)  # instruction of 3
    padded = pad_response_to_block(tokens, 3, PAD, block_size=4)
    assert padded.tolist() == [1, 2, 3, 9, 9, EOS, PAD]
    assert padded.dtype == np.int32
    exact = pad_response_to_block(np.array([1, 5, 5, 5, EOS]), 1, PAD, block_size=4)
    assert exact.tolist() == [1, 5, 5, 5, EOS]
    with pytest.raises(ValueError, match="no response"):
        pad_response_to_block(np.array([1, 2]), 2, PAD)


# --------------------------------------------------------------------------- any-to-any canvases


@pytest.mark.parametrize(
    ("modality", "begin", "end"), [("image", "<BOI>", "<EOI>"), ("audio", "<BOA>", "<EOA>")]
)
def test_media_response_structure(modality: str, begin: str, end: str) -> None:
    canvas = media_canvas(modality, 5, 2, VOCAB)
    b, e = LAYOUT.special_id(begin), LAYOUT.special_id(end)
    assert canvas.ids[0].tolist() == [b, MASK, MASK, MASK, MASK, MASK, e, EOS]
    assert canvas.group[1].tolist() == [FIXED] + [GROUPS.index(modality)] * 5 + [FIXED] * 2
    x1 = clean_target(canvas, seed=2)
    config = SamplerConfig(steps=2, temperature=0)
    rows = sample_response(
        OraclePredictor(x1), paths()["masked"], modality, 2, VOCAB, config, media_tokens=5
    )
    for row, target in zip(rows, x1, strict=True):
        assert row[0] == b and row[-1] == e and len(row) == 7
        assert torch.equal(row, target[:7])
        assert bool((GROUPS.group_of(row[1:-1]) == GROUPS.index(modality)).all())


def test_text_canvas_pads_short_rows() -> None:
    canvas = text_canvas(torch.tensor([2, 4]), VOCAB)
    assert canvas.ids.tolist() == [[MASK, MASK, PAD, PAD], [MASK] * 4]
    assert canvas.free.tolist() == [[True, True, False, False], [True] * 4]


def test_sampler_config_validation() -> None:
    with pytest.raises(ConfigError, match="multiple of block_size"):
        validate(SamplerConfig, {"block_size": 32, "max_length": 100})
    with pytest.raises(ConfigError, match="exactly one"):
        validate(SamplerConfig, {"cache": {"refresh_ratio": None}})


# --------------------------------------------------------------------------- the real tiny model


# An untied LM head: the random model's argmax then varies over positions instead of
# echoing one token, so equality of generated sequences means something.
UNTIED = ("backbone.tie_word_embeddings=false",)


@pytest.fixture(scope="module")
def model() -> OmniModel:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    codebooks = {
        "image": torch.randn(16, 8, generator=gen),
        "audio": torch.randn(12, 6, generator=gen),
    }
    model = OmniModel(load_model_config("tiny", UNTIED), LAYOUT, codebooks).eval()
    # Trained values, not the zero init: every cached path must add the same offsets.
    torch.nn.init.normal_(model.response_position.weight, std=0.5)
    return model


def instructions() -> tuple[Tensor, Tensor]:
    """Two instructions of 7 and 4 tokens, right padded."""
    ids = torch.randint(0, LAYOUT.size, (2, 7), generator=torch.Generator().manual_seed(2))
    return ids, torch.arange(7)[None, :] < torch.tensor([[7], [4]])


def canvases(steps: int) -> list[Tensor]:
    """A response of 24 positions unmasking 3 tokens per step, as a denoising run would."""
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, LAYOUT.text_size, (2, 24), generator=g)
    order = torch.randperm(24, generator=g)
    out = []
    for step in range(steps):
        canvas = torch.full((2, 24), MASK)
        shown = order[: 3 * step]
        canvas[:, shown] = clean[:, shown]
        out.append(canvas)
    return out


@torch.inference_mode()
def test_adaptive_cache_ratio_one_equals_no_cache(model: OmniModel) -> None:
    ids, valid = instructions()
    exact = ModelPredictor(model, ids, valid, CacheConfig(enabled=False))
    cached = ModelPredictor(model, ids, valid, CacheConfig(refresh_ratio=1.0, full_refresh_every=4))
    for canvas in canvases(6):
        torch.testing.assert_close(cached.hidden(canvas), exact.hidden(canvas), atol=1e-5, rtol=0)
    # The packed no-cache forward is the row run alone, unpadded.
    alone = model(
        torch.cat([ids[1:, :4], canvases(1)[0][1:]], 1), instruction_lengths=torch.tensor([4])
    )
    torch.testing.assert_close(exact.hidden(canvases(1)[0])[1], alone[0, 4:], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_logits_are_reused_only_where_the_hidden_state_is_unchanged(
    model: OmniModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, valid = instructions()
    cache = CacheConfig(refresh_ratio=0.25, full_refresh_every=4)
    predictor, twin = (ModelPredictor(model, ids, valid, cache) for _ in range(2))
    head = model.head_logits
    rows: list[int] = []
    monkeypatch.setattr(model, "head_logits", lambda h, g: rows.append(len(h)) or head(h, g))
    for step, canvas in enumerate(canvases(6)):
        select = {"text": canvas == MASK, "image": canvas != MASK}
        rows.clear()
        logits = predictor(canvas, select)
        hidden = twin.hidden(canvas)
        for name, where in select.items():
            torch.testing.assert_close(logits[name], head(hidden[where], name), atol=1e-5, rtol=0)
        full = step % 4 == 0  # the first call and every 4th refresh everything
        assert (sum(rows) == 2 * 24) == full  # partial steps run the head on fewer positions


@torch.inference_mode()
def test_adaptive_cache_small_ratio_stays_close_and_refreshes_on_schedule(model: OmniModel) -> None:
    ids, valid = instructions()
    exact = ModelPredictor(model, ids, valid, CacheConfig(enabled=False))
    cached = ModelPredictor(
        model, ids, valid, CacheConfig(refresh_ratio=0.25, full_refresh_every=3)
    )
    work, previous = [], None
    for canvas in canvases(7):
        before = cached.recomputed
        ref, approx = exact.hidden(canvas), cached.hidden(canvas)
        work.append((cached.recomputed - before) / (2 * 2 * 24))  # layers x rows x positions
        similarity = torch.nn.functional.cosine_similarity(approx, ref, dim=-1)
        assert float(similarity.mean()) > 0.97
        if previous is not None:  # closer than reusing the last step's features unchanged
            assert (approx - ref).norm(dim=-1).mean() < (previous - ref).norm(dim=-1).mean()
        previous = ref
    assert work == [1.0, 0.25, 0.25, 1.0, 0.25, 0.25, 1.0]
    assert cached.recomputed / cached.full_equivalent == pytest.approx(3.0 / 7 + 4 * 0.25 / 7)


@torch.inference_mode()
@pytest.mark.parametrize(
    ("method", "name", "target"), [("confidence", "masked", "text"), ("euler", "uniform", "image")]
)
def test_generation_with_ratio_one_equals_no_cache(
    model: OmniModel, method: str, name: str, target: str
) -> None:
    ids, valid = instructions()
    temperature = 0.0 if method == "confidence" else 1.0
    outputs = []
    for cache in (CacheConfig(enabled=False), CacheConfig(refresh_ratio=1.0)):
        config = SamplerConfig(
            method=method,
            steps=8,
            temperature=temperature,
            block_size=16,
            max_length=32,
            cache=cache,
        )
        outputs.append(
            generate(
                model,
                ids,
                target,
                paths()[name],
                config,
                valid,
                media_tokens=24,
                generator=torch.Generator().manual_seed(0),
            )
        )
    exact, cached = ([r.tolist() for r in rows] for rows in outputs)
    assert cached == exact
    assert len({token for row in exact for token in row}) >= 3  # not one token repeated


@torch.inference_mode()
def test_forward_response_at_every_position_equals_the_full_pass(model: OmniModel) -> None:
    ids, valid = instructions()
    prompt = model.encode_instruction(ids, valid)
    first, second = canvases(3)[1:]
    _, cache = model.forward_response(first, prompt)
    full, _ = model.forward_response(second, prompt)
    every = torch.arange(24).expand(2, -1)
    partial, _ = model.forward_response(second, prompt, cache=cache, positions=every)
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_active_cache_recomputes_the_asked_and_the_changed_positions_only(
    model: OmniModel,
) -> None:
    ids, valid = instructions()
    cache = CacheConfig(strategy="active", full_refresh_every=100)
    predictor = ModelPredictor(model, ids, valid, cache)
    steps = canvases(4)
    previous = predictor.hidden(steps[0])
    for before, canvas in zip(steps, steps[1:], strict=False):
        asked = torch.zeros_like(canvas, dtype=torch.bool)
        asked[:, :2] = True
        work = predictor.recomputed
        hidden = predictor.hidden(canvas, {"text": asked})
        needed = asked | (canvas != before)
        assert predictor.recomputed - work == 2 * 2 * int(needed[0].sum())  # layers x rows
        # Every other position keeps exactly its features; the recomputed ones move.
        assert torch.equal(hidden[~needed], previous[~needed])
        assert bool((hidden[needed] != previous[needed]).any(-1).all())
        previous = hidden


class Tee:
    """Samples with the cached predictor; records how far its logits are from exact ones."""

    def __init__(self, cached: ModelPredictor, exact: ModelPredictor) -> None:
        self.cached, self.exact = cached, exact
        self.errors: list[float] = []
        self.agreement: list[float] = []

    def __call__(self, response: Tensor, select: Mapping[str, Tensor]) -> dict[str, Tensor]:
        approx, truth = self.cached(response, select), self.exact(response, select)
        for name in approx:
            spread = truth[name] - truth[name].mean(-1, keepdim=True)
            self.errors.append(float((approx[name] - truth[name]).norm() / spread.norm()))
            same = approx[name].argmax(-1) == truth[name].argmax(-1)
            self.agreement.append(float(same.float().mean()))
        return approx


@torch.inference_mode()
def test_cached_logits_stay_close_during_generation(model: OmniModel) -> None:
    """A denoising run (2 tokens per step over 32 positions, full refresh every 8 calls)
    with the cached logits: they stay near the exact ones on the same canvases, nearer the
    more is refreshed, and the argmax mostly agrees."""
    ids, valid = instructions()
    config = SamplerConfig(tokens_per_step=2, temperature=0, block_size=32, max_length=32)
    mean_error = {}
    for ratio in (0.5, 0.1):
        cache = CacheConfig(refresh_ratio=ratio, full_refresh_every=8)
        tee = Tee(
            ModelPredictor(model, ids, valid, cache),
            ModelPredictor(model, ids, valid, CacheConfig(enabled=False)),
        )
        sample_response(tee, paths()["masked"], "text", 2, VOCAB, config)
        assert len(tee.errors) == 17  # the DGS probe, then 16 steps
        mean_error[ratio] = sum(tee.errors) / len(tee.errors)
        if ratio == 0.5:
            assert max(tee.errors) < 0.3
            assert sum(tee.agreement) / len(tee.agreement) >= 0.9
    assert mean_error[0.5] < mean_error[0.1]


@torch.inference_mode()
@pytest.mark.parametrize("target", ["image", "audio"])
def test_model_generates_media_within_its_structure(model: OmniModel, target: str) -> None:
    ids, valid = instructions()
    config = SamplerConfig(steps=3)
    rows = generate(model, ids, target, paths()["masked"], config, valid, media_tokens=6)
    begin, end = (LAYOUT.special_id(m) for m in MEDIA_MARKERS[target])
    for row in rows:
        assert len(row) == 8 and row[0] == begin and row[-1] == end
        assert bool((GROUPS.group_of(row[1:-1]) == GROUPS.index(target)).all())


@torch.inference_mode()
def test_block_decoding_with_the_active_cache_stays_close(model: OmniModel) -> None:
    """Blocks of 8 over 32 positions, 2 tokens per step, the active cache: logits near the
    exact ones on the same canvases, nearer with a full refresh at every block start (every
    4 steps) than with none after the first call, where the cached future ``<MASK>``
    features grow stale. A trained model's agreement is measured, not asserted."""
    ids, valid = instructions()
    config = SamplerConfig(
        tokens_per_step=2, temperature=0, block_size=32, max_length=32, decode_block=8
    )
    mean_error = {}
    for every in (4, 1000):
        cache = CacheConfig(strategy="active", full_refresh_every=every)
        tee = Tee(
            ModelPredictor(model, ids, valid, cache),
            ModelPredictor(model, ids, valid, CacheConfig(enabled=False)),
        )
        sample_response(tee, paths()["masked"], "text", 2, VOCAB, config)
        assert len(tee.errors) == 17  # the DGS probe, then 4 blocks of 4 steps
        assert max(tee.errors) < 0.3
        mean_error[every] = sum(tee.errors) / len(tee.errors)
        if every == 4:
            assert sum(tee.agreement) / len(tee.agreement) >= 0.9
    assert mean_error[4] < mean_error[1000]


def _copy_cache(cache: ResponseCache) -> ResponseCache:
    return ResponseCache(
        [k.clone() for k in cache.keys],
        [v.clone() for v in cache.values],
        [x.clone() for x in cache.outputs],
        cache.recomputed,
    )


@torch.inference_mode()
def test_active_steps_compiled_recompute_a_power_of_two_of_positions(model: OmniModel) -> None:
    ids, valid = instructions()
    before, canvas = canvases(3)[1:]
    asked = torch.zeros_like(canvas, dtype=torch.bool)
    asked[:, 5:10] = True
    counts = {}
    for compiled in (False, True):
        cache = CacheConfig(strategy="active", full_refresh_every=100, compile=compiled)
        predictor = ModelPredictor(model, ids, valid, cache)
        predictor._response = before
        picked = predictor._active_positions(canvas, {"text": asked})
        needed = asked | (canvas != before)
        chosen = torch.zeros_like(needed).scatter(1, picked, True)
        assert bool((chosen | ~needed).all())  # every needed position is recomputed
        counts[compiled] = picked.shape[1]
    assert counts[False] == int(needed.sum(1).max()) == 8  # 5 asked, 3 just committed
    assert counts[True] == 8
    asked[:, 10] = True
    predictor._response = before
    assert predictor._active_positions(canvas, {"text": asked}).shape[1] == 16


@pytest.mark.integration
@torch.inference_mode()
def test_compiled_positions_pass_equals_the_eager_one_with_one_graph_per_shape(
    model: OmniModel,
) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids, valid = instructions()
    prompt = model.encode_instruction(ids, valid)
    first, second, third = canvases(4)[1:]
    _, start = model.forward_response(first, prompt)
    eager, compiled = _copy_cache(start), _copy_cache(start)
    for canvas, count in ((second, 4), (third, 4), (third, 8)):
        picked = torch.stack([torch.randperm(24)[:count].sort().values for _ in range(2)])
        want, eager = model.forward_response(canvas, prompt, cache=eager, positions=picked)
        got, compiled = model.forward_response(
            canvas, prompt, cache=compiled, positions=picked, compiled=True
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for a, b in zip(compiled.outputs + compiled.keys, eager.outputs + eager.keys, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert compiled.recomputed == eager.recomputed == 2 * 2 * count
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # n = 4, then 8


@pytest.mark.integration
@torch.inference_mode()
def test_block_decoding_compiled_stays_close_to_exact_logits(model: OmniModel) -> None:
    """The block sampler with the active cache compiled: the logits it samples from stay as
    close to exact ones on the same canvases as the eager cache's do."""
    ids, valid = instructions()
    config = SamplerConfig(
        tokens_per_step=2, temperature=0, block_size=32, max_length=32, decode_block=8
    )
    errors = {}
    for compiled in (False, True):
        cache = CacheConfig(strategy="active", full_refresh_every=4, compile=compiled)
        tee = Tee(
            ModelPredictor(model, ids, valid, cache),
            ModelPredictor(model, ids, valid, CacheConfig(enabled=False)),
        )
        sample_response(tee, paths()["masked"], "text", 2, VOCAB, config)
        assert len(tee.errors) == 17
        errors[compiled] = sum(tee.errors) / len(tee.errors)
        assert sum(tee.agreement) / len(tee.agreement) >= 0.9
    assert errors[True] < 0.3 and errors[True] <= errors[False] * 1.5 + 1e-3, errors


@pytest.mark.integration
@torch.inference_mode()
def test_compiled_steps_write_to_the_same_buffers_across_full_refreshes(
    model: OmniModel,
) -> None:
    """A pass captured as a CUDA graph replays on the addresses it was captured with: after
    a full refresh the new cache's values go into the buffers of the one before."""
    ids, valid = instructions()
    cache = CacheConfig(strategy="active", full_refresh_every=3, compile=True)
    predictor = ModelPredictor(model, ids, valid, cache)
    exact = ModelPredictor(model, ids, valid, CacheConfig(enabled=False))
    asked = torch.zeros(2, 24, dtype=torch.bool)
    asked[:, :4] = True
    addresses = set()
    for step, canvas in enumerate(canvases(8)):
        hidden = predictor.hidden(canvas, {"text": asked})
        if step % 3:  # a partial step (steps 0, 3, 6 refresh in full)
            held = predictor._response_cache
            buffers = (*held.joint_keys, *held.joint_values, *held.outputs)
            addresses.add(tuple(b.data_ptr() for b in buffers))
        else:
            torch.testing.assert_close(hidden, exact.hidden(canvas), atol=1e-5, rtol=0)
    assert len(addresses) == 1
