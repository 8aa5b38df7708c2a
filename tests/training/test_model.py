"""OmniModel: masks, equality with transformers' Qwen2, caches, heads, persistence, configs."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

from infra.config import ConfigError
from tokenization.vocab import VocabLayout
from training.attention import AttentionMask, attend, resolve_backend
from training.model import OmniModel
from training.model_config import ModelConfig, load_model_config

LAYOUT = VocabLayout(text_size=100, image_size=32, audio_size=24)
TEXT_ROWS = LAYOUT.offsets["image"]  # text + specials
EOS = LAYOUT.special_id("<EOS>")
MASK = LAYOUT.special_id("<MASK>")
ATOL = 1e-5
CPU = torch.device("cpu")
PREFIX = torch.tensor([3, 0])


def codebooks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(LAYOUT.image_size, 8, generator=gen),
        "audio": torch.randn(LAYOUT.audio_size, 6, generator=gen),
    }


@pytest.fixture(scope="module")
def model() -> OmniModel:
    torch.manual_seed(0)
    model = OmniModel(load_model_config("tiny"), LAYOUT, codebooks()).eval()
    # Trained values, not the zero init: every path must add the same response offsets.
    torch.nn.init.normal_(model.response_position.weight, std=0.5)
    return model


def ids(batch: int, length: int, seed: int = 0, high: int = LAYOUT.size) -> torch.Tensor:
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def lengths_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------------- masks


@torch.no_grad()
def test_dfm_mode_is_bidirectional_and_ar_mode_causal(model: OmniModel) -> None:
    x = ids(2, 12)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % LAYOUT.size
    assert not torch.allclose(model(x)[:, 0], model(y)[:, 0], atol=1e-4)
    torch.testing.assert_close(model(x, causal=True)[:, :-1], model(y, causal=True)[:, :-1])


@torch.no_grad()
@pytest.mark.parametrize("mode", ["bidirectional", "instruction", "causal"])
def test_padding_does_not_change_real_tokens(model: OmniModel, mode: str) -> None:
    x = ids(3, 10)
    valid = lengths_mask([10, 7, 4], 10)
    kwargs = {"causal": mode == "causal"}
    if mode == "instruction":
        kwargs["instruction_lengths"] = torch.tensor([3, 2, 2])
    out = model(x, attention_mask=valid, **kwargs)
    junk = torch.where(valid, x, ids(3, 10, seed=5))
    torch.testing.assert_close(model(junk, attention_mask=valid, **kwargs)[valid], out[valid])
    for row, n in enumerate([10, 7, 4]):  # also equal to the row run alone, unpadded
        alone = {**kwargs}
        if mode == "instruction":
            alone["instruction_lengths"] = kwargs["instruction_lengths"][row : row + 1]
        single = model(x[row : row + 1, :n], **alone)[0]
        torch.testing.assert_close(single, out[row, :n], atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_is_refused(model: OmniModel) -> None:
    with pytest.raises(ValueError, match="right padding"):
        model(ids(1, 4), attention_mask=torch.tensor([[False, True, True, True]]))


@torch.no_grad()
def test_instruction_mask(model: OmniModel) -> None:
    x, n = ids(2, 12), 5
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1) % LAYOUT.size
    lengths = torch.tensor([n, n])
    a = model(x, instruction_lengths=lengths)
    b = model(y, instruction_lengths=lengths)
    torch.testing.assert_close(a[:, :n], b[:, :n])  # the instruction never sees the response
    assert not torch.allclose(a[:, n:8], b[:, n:8], atol=1e-4)  # other response positions do
    assert not torch.allclose(a[:, :n], model(x)[:, :n], atol=1e-4)  # differs from full bidir.


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_equals_transformers_qwen2(model: OmniModel, padded: bool) -> None:
    x = ids(2, 9, high=TEXT_ROWS)
    valid = lengths_mask([9, 6], 9) if padded else None
    kw = {"attention_mask": valid} if padded else {}
    select = valid if padded else torch.ones(2, 9, dtype=torch.bool)
    backbone = model.backbone
    try:
        expected = backbone(input_ids=x, **kw).last_hidden_state
        torch.testing.assert_close(model(x, causal=True, **kw)[select], expected[select])
        backbone.config.is_causal = False
        expected = backbone(input_ids=x, **kw).last_hidden_state
        torch.testing.assert_close(model(x, **kw)[select], expected[select])
    finally:
        backbone.config.is_causal = True


# ---------------------------------------------------------------------- inputs and heads


def test_embeddings_per_modality(model: OmniModel) -> None:
    image, audio = LAYOUT.offsets["image"] + 3, LAYOUT.offsets["audio"] + 5
    x = torch.tensor([[7, MASK, image, audio]])
    out = model.embed(x)[0]
    table = model.backbone.embed_tokens.weight
    torch.testing.assert_close(out[0], table[7])
    torch.testing.assert_close(out[1], table[MASK])
    book = codebooks()
    torch.testing.assert_close(out[2], model.projections["image"](book["image"][3]))
    torch.testing.assert_close(out[3], model.projections["audio"](book["audio"][5]))
    out[1].sum().backward()  # <MASK> is a learned row; the codebooks are frozen buffers
    assert table.grad[MASK].abs().sum() > 0 and table.grad[7].abs().sum() == 0
    assert all("codebook" not in name for name, _ in model.named_parameters())
    model.zero_grad()


def test_head_logits_and_reconstruction_shapes(model: OmniModel) -> None:
    hidden = torch.randn(5, 64)
    assert model.head_logits(hidden, "text").shape == (5, TEXT_ROWS)
    assert model.head_logits(hidden, "image").shape == (5, LAYOUT.image_size)
    assert model.head_logits(hidden, "audio").shape == (5, LAYOUT.audio_size)
    with pytest.raises(KeyError, match="video"):
        model.head_logits(hidden, "video")
    assert model.reconstruct(hidden, "image").shape == (5, 8)
    assert model.reconstruct(hidden, "audio").shape == (5, 6)
    image_ids = torch.tensor([0, 31]) + LAYOUT.offsets["image"]
    torch.testing.assert_close(
        model.codebook_targets(image_ids, "image"), codebooks()["image"][[0, 31]]
    )
    with pytest.raises(ValueError, match="image block"):
        model.codebook_targets(torch.tensor([LAYOUT.offsets["audio"]]), "image")


@torch.no_grad()
def test_eos_embedding_is_first_eos_hidden(model: OmniModel) -> None:
    x = ids(2, 10, high=TEXT_ROWS)
    x[x == EOS] = 1
    x[0, 6], x[0, 8], x[1, 3] = EOS, EOS, EOS
    lengths = torch.tensor([2, 2])
    hidden = model(x, instruction_lengths=lengths)
    got = model.eos_embedding(x, instruction_lengths=lengths)
    torch.testing.assert_close(got, torch.stack([hidden[0, 6], hidden[1, 3]]))
    x[1, 3] = 1
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model.eos_embedding(x)


# ---------------------------------------------------------------------- DFM caches


@torch.no_grad()
def test_response_positions_tell_the_masks_of_a_response_apart(model: OmniModel) -> None:
    """Identical ``<MASK>`` inputs get their response offset's embedding (the instruction
    none), so even a first layer tells them apart; zero-initialised, they change nothing."""
    mask = LAYOUT.special_id("<MASK>")
    sequence = torch.cat([ids(1, 4, seed=3), torch.full((1, 5), mask)], 1)
    offsets = torch.arange(9)[None] - 4
    inputs = model.embed(sequence, offsets)
    torch.testing.assert_close(inputs[:, :4], model.embed(sequence)[:, :4])
    table = model.response_position.weight
    torch.testing.assert_close(inputs[0, 4:] - model.embed(sequence)[0, 4:], table[:5])
    fresh = OmniModel(load_model_config("tiny"), LAYOUT, codebooks()).eval()
    assert fresh.response_position.num_embeddings == 64
    torch.testing.assert_close(fresh.embed(sequence, offsets), fresh.embed(sequence))


@torch.no_grad()
def test_forward_response_without_cache_equals_forward(model: OmniModel) -> None:
    prompt, response = ids(2, 6, seed=1), ids(2, 8, seed=2)
    hidden, cache = model.forward_response(response, model.encode_instruction(prompt))
    full = model(torch.cat([prompt, response], 1), instruction_lengths=torch.tensor([6, 6]))
    torch.testing.assert_close(hidden, full[:, 6:], atol=ATOL, rtol=0)
    assert cache.recomputed == len(model.layers) * 2 * 8


@torch.no_grad()
def test_forward_response_with_padded_instructions(model: OmniModel) -> None:
    prompt, response = ids(2, 6, seed=1), ids(2, 5, seed=2)
    valid = lengths_mask([6, 3], 6)
    hidden, _ = model.forward_response(response, model.encode_instruction(prompt, valid))
    for row, n in enumerate([6, 3]):  # positions continue right after each row's instruction
        alone = torch.cat([prompt[row, :n], response[row]])[None]
        full = model(alone, instruction_lengths=torch.tensor([n]))[0, n:]
        torch.testing.assert_close(hidden[row], full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_refresh_ratio_one_equals_no_cache(model: OmniModel) -> None:
    instruction = model.encode_instruction(ids(2, 6, seed=1))
    old, new = ids(2, 8, seed=2), ids(2, 8, seed=3)
    _, cache = model.forward_response(old, instruction)
    exact, _ = model.forward_response(new, instruction)
    cached, refreshed = model.forward_response(new, instruction, cache, refresh_ratio=1.0)
    torch.testing.assert_close(cached, exact, atol=ATOL, rtol=0)
    assert refreshed.recomputed == len(model.layers) * 2 * 8


@torch.no_grad()
@pytest.mark.parametrize("setting", [{"refresh_ratio": 0.25}, {"refresh_threshold": 0.999}])
def test_partial_refresh_stays_close_and_recomputes_less(model: OmniModel, setting: dict) -> None:
    instruction = model.encode_instruction(ids(2, 6, seed=1))
    old = ids(2, 16, seed=2)
    new = old.clone()
    new[:, 4] = MASK  # one denoising step changes few positions
    stale, cache = model.forward_response(old, instruction)
    exact, _ = model.forward_response(new, instruction)
    cached, updated = model.forward_response(new, instruction, cache, **setting)
    full = len(model.layers) * 2 * 16
    assert 0 < updated.recomputed < full
    # The changed position is refreshed (its value vector moved most), so it lands near the
    # exact result; the canvas as a whole is far closer to it than the stale pass.
    assert (cached[:, 4] - exact[:, 4]).norm() < 0.2 * (stale[:, 4] - exact[:, 4]).norm()
    assert (cached - exact).norm() < 0.5 * (stale - exact).norm()


def test_cache_arguments_are_checked(model: OmniModel) -> None:
    instruction = model.encode_instruction(ids(1, 3))
    _, cache = model.forward_response(ids(1, 4), instruction)
    with pytest.raises(ValueError, match="exactly one"):
        model.forward_response(ids(1, 4), instruction, cache)
    with pytest.raises(ValueError, match="cache holds"):
        model.forward_response(ids(1, 5), instruction, cache, refresh_ratio=0.5)


# ---------------------------------------------------------------------- AR mode


@torch.no_grad()
def test_ar_prefill_and_steps_equal_causal_forward(model: OmniModel) -> None:
    x = ids(2, 12, seed=4)
    kv = model.ar_prefill(x[:, :5], capacity=6)  # forces one growth of the buffers
    steps = [
        model.ar_step(x[:, 5:8], kv),
        model.ar_step(x[:, 8:9], kv),
        model.ar_step(x[:, 9:], kv),
    ]
    full = model(x, causal=True)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(kv.last_hidden, full[:, -1], atol=ATOL, rtol=0)
    assert kv.length == 12


@torch.no_grad()
def test_ar_with_padded_prompts(model: OmniModel) -> None:
    prompt, more = ids(2, 5, seed=6), ids(2, 3, seed=7)
    kv = model.ar_prefill(prompt, attention_mask=lengths_mask([5, 2], 5))
    first_prefill = kv.last_hidden.clone()
    steps = torch.cat([model.ar_step(more[:, :2], kv), model.ar_step(more[:, 2:], kv)], 1)
    for row, n in enumerate([5, 2]):
        alone = model(torch.cat([prompt[row, :n], more[row]])[None], causal=True)[0]
        torch.testing.assert_close(first_prefill[row], alone[n - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(steps[row], alone[n:], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- weights


def test_save_load_round_trip_serves_both_modes(model: OmniModel, tmp_path) -> None:
    model.save(tmp_path / "ckpt")
    loaded = OmniModel.load(tmp_path / "ckpt").eval()
    assert loaded.layout == LAYOUT and loaded.config == model.config
    x = ids(2, 7)
    with torch.no_grad():
        dfm, ar = loaded(x), loaded(x, causal=True)
        torch.testing.assert_close(dfm, model(x))
        torch.testing.assert_close(ar, model(x, causal=True))
    assert not torch.allclose(dfm, ar, atol=1e-4)
    assert loaded.lm_head.weight is loaded.backbone.embed_tokens.weight  # still tied


def test_from_pretrained_causal_lm(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    base = load_model_config("tiny")
    lm = Qwen2ForCausalLM(base.backbone.to_qwen2(vocab_size=90))  # fewer rows than T + S
    lm.save_pretrained(tmp_path / "lm")
    config = base.model_copy(update={"pretrained": str(tmp_path / "lm")})
    model = OmniModel(config, LAYOUT, codebooks())
    table = model.backbone.embed_tokens.weight
    assert table.shape[0] == TEXT_ROWS
    torch.testing.assert_close(table[:90], lm.model.embed_tokens.weight)
    x = ids(2, 7, high=90)
    with torch.no_grad():
        expected = lm.model(input_ids=x).last_hidden_state
        torch.testing.assert_close(model(x, causal=True), expected)
    wrong = config.model_copy(
        update={"backbone": base.backbone.model_copy(update={"intermediate_size": 96})}
    )
    with pytest.raises(ValueError, match="backbone.intermediate_size: config 96, pretrained 128"):
        OmniModel(wrong, LAYOUT, codebooks())


def test_from_tokenizers_uses_their_layout_and_codebooks() -> None:
    books = codebooks()
    tokenizers = types.SimpleNamespace(
        layout=LAYOUT,
        image=types.SimpleNamespace(codebook_vectors=lambda: books["image"]),
        audio=types.SimpleNamespace(codebook_vectors=lambda: books["audio"]),
    )
    model = OmniModel.from_tokenizers(load_model_config("tiny"), tokenizers)
    assert model.layout == LAYOUT and model.groups.size["image"] == LAYOUT.image_size
    torch.testing.assert_close(model.codebook("audio"), books["audio"])


@torch.no_grad()
def test_bfloat16_model_tracks_float32(model: OmniModel) -> None:
    config = model.config.model_copy(update={"dtype": "bfloat16"})
    half = OmniModel(config, LAYOUT, codebooks()).eval()
    half.load_state_dict(model.state_dict())
    x = ids(2, 40)
    out = half(x, instruction_lengths=torch.tensor([10, 20]))
    assert out.dtype == torch.bfloat16
    # RoPE angles stay float32 (a bf16 inv_freq would put position 39 far off).
    assert half.rotary.inv_freq.dtype == torch.float32
    reference = model(x, instruction_lengths=torch.tensor([10, 20]))
    assert F.cosine_similarity(out.float(), reference, dim=-1).min() > 0.98


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = OmniModel(load_model_config("tiny"), LAYOUT, codebooks())
    config = plain.config.model_copy(update={"gradient_checkpointing": True})
    recomputed = OmniModel(config, LAYOUT, codebooks())
    recomputed.load_state_dict(plain.state_dict())
    x = ids(2, 6)
    for m in (plain, recomputed):
        m(x, instruction_lengths=torch.tensor([2, 3])).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


# ---------------------------------------------------------------------- configs


def test_presets_have_their_shapes() -> None:
    seven, small = load_model_config("7b").backbone, load_model_config("small").backbone
    assert (seven.hidden_size, seven.num_hidden_layers, seven.num_attention_heads) == (3584, 28, 28)
    assert (seven.num_key_value_heads, seven.intermediate_size, seven.rope_theta) == (4, 18944, 1e6)
    one = load_model_config("1b5").backbone
    assert (one.hidden_size, one.num_attention_heads, one.num_key_value_heads) == (1536, 12, 2)
    assert (one.intermediate_size, one.tie_word_embeddings) == (8960, True)
    assert (small.hidden_size, small.num_hidden_layers, small.num_key_value_heads) == (768, 12, 4)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="backbone.num_hidden_layers"):
        load_model_config("tiny", ("backbone.num_hidden_layers=0",))
    with pytest.raises(ConfigError, match="attention"):
        load_model_config("tiny", ("attention=eager",))
    with pytest.raises(ConfigError, match="backbone.*num_key_value_heads=3"):
        load_model_config("tiny", ("backbone.num_key_value_heads=3",))
    with pytest.raises(KeyError, match="known"):
        load_model_config("huge")
    with pytest.raises(ValueError, match="image codebook has 4 vectors"):
        OmniModel(ModelConfig(backbone=load_model_config("tiny").backbone), LAYOUT,
                  {"image": torch.zeros(4, 2), "audio": torch.zeros(24, 2)})  # fmt: skip


# ---------------------------------------------------------------------- attention dispatch


def test_backend_decision() -> None:
    cuda, cpu, bf16, f32 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16, torch.float32
    assert resolve_backend("auto", cuda, bf16, 128, flash_available=True) == "flash_attention_2"
    assert resolve_backend("auto", cuda, bf16, 128, flash_available=False) == "sdpa"
    assert resolve_backend("auto", cpu, bf16, 128, flash_available=True) == "sdpa"
    assert resolve_backend("auto", cuda, f32, 128, flash_available=True) == "sdpa"
    assert resolve_backend("auto", cuda, bf16, 512, flash_available=True) == "sdpa"
    assert resolve_backend("sdpa", cuda, bf16, 128, flash_available=True) == "sdpa"
    with pytest.raises(ValueError, match="not installed.*not cuda"):
        resolve_backend("flash_attention_2", cpu, bf16, 128, flash_available=False)
    valid = torch.ones(2, 6, dtype=torch.bool)
    assert AttentionMask(valid, causal=True).flash_expressible(6, 6)
    assert AttentionMask(None, causal=True).flash_expressible(2, 6)
    assert AttentionMask(valid, causal=True).flash_expressible(1, 6)
    assert not AttentionMask(valid, causal=True).flash_expressible(2, 6)
    assert AttentionMask(prefix_lengths=torch.tensor([2, 3])).flash_expressible(6, 6)


def _reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    softmax_scale: float,
    causal: bool,
) -> torch.Tensor:
    """flash_attn_varlen_func's contract, one sequence at a time (bottom-right causal)."""
    out = []
    for b in range(len(cu_q) - 1):
        qs, ks = q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]]
        vs = v[cu_k[b] : cu_k[b + 1]]
        groups = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        if causal:
            lq, lk = qs.shape[0], ks.shape[0]
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
    return torch.cat(out)


@pytest.mark.parametrize(
    "mask,q_len",
    [
        (AttentionMask(), 6),
        (AttentionMask(torch.tensor([[True] * 6, [True] * 4 + [False] * 2])), 6),
        (AttentionMask(torch.tensor([[True] * 6, [True] * 4 + [False] * 2]), causal=True), 6),
        (AttentionMask(None, causal=True), 3),
        (AttentionMask(torch.tensor([[True] * 6, [True] * 4 + [False] * 2]), causal=True), 1),
        (AttentionMask(prefix_lengths=torch.tensor([2, 6])), 6),
        (
            AttentionMask(
                torch.tensor([[True] * 6, [True] * 5 + [False]]),
                prefix_lengths=torch.tensor([3, 0]),
            ),
            6,
        ),  # fmt: skip
    ],
)
def test_flash_path_equals_sdpa(
    monkeypatch: pytest.MonkeyPatch, mask: AttentionMask, q_len: int
) -> None:
    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_reference_varlen)
    )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k, v = torch.randn(2, 2, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    flash = attend(q, k, v, mask, 0.3, "flash_attention_2")
    sdpa = attend(q, k, v, mask, 0.3, "sdpa")
    real = torch.ones(2, q_len, dtype=torch.bool)
    if mask.key_valid is not None and q_len == 6:
        real = mask.key_valid  # outputs at padding queries are unspecified
    torch.testing.assert_close(flash.transpose(1, 2)[real], sdpa.transpose(1, 2)[real])


@torch.no_grad()
def test_model_on_the_flash_path_equals_sdpa(
    model: OmniModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def kernel(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs["causal"])
        return _reference_varlen(*args, **kwargs)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=kernel)
    )
    x, valid = ids(2, 10), lengths_mask([10, 7], 10)
    lengths = torch.tensor([4, 3])
    instruction = model.encode_instruction(x[:, :4], lengths_mask([4, 3], 4))

    def run() -> list[torch.Tensor]:
        kv = model.ar_prefill(x[:, :6], attention_mask=lengths_mask([6, 4], 6))
        return [
            model(x, attention_mask=valid, instruction_lengths=lengths)[valid],
            model(x, attention_mask=valid, causal=True)[valid],
            model.forward_response(x[:, 4:], instruction)[0],
            model.ar_step(x[:, 6:9], kv),
            model.ar_step(x[:, 9:], kv),
        ]

    expected = run()
    monkeypatch.setattr(OmniModel, "backend", property(lambda self: "flash_attention_2"))
    assert not calls
    for got, want in zip(run(), expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Per layer: prefill 1, DFM prefix mask 2, causal 1, response 1, one-token step 1; the
    # three-token step over a padded cache is not expressible in flash, SDPA takes it.
    assert len(calls) == len(model.layers) * 6 and any(calls)


def test_sdpa_gets_no_dense_mask_when_unneeded() -> None:
    assert AttentionMask().dense(5, 5, CPU) == (None, False)
    assert AttentionMask(causal=True).dense(5, 5, CPU) == (None, True)
    assert AttentionMask(causal=True).dense(1, 5, CPU) == (None, False)
    dense, is_causal = AttentionMask(torch.ones(1, 5, dtype=torch.bool), causal=True).dense(
        2, 5, CPU
    )
    assert dense.dtype == torch.bool and not is_causal
    assert dense[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


@torch.no_grad()
def test_media_scale_matches_text_embeddings(model: OmniModel) -> None:
    media = model.embed(torch.arange(LAYOUT.offsets["image"], LAYOUT.size)[None])
    text_std = model.backbone.embed_tokens.weight.std()
    assert 0.3 < float(media.std() / text_std) < 3
    assert F.cosine_similarity(media[0, 0], media[0, 1], dim=0).abs() < 0.9
