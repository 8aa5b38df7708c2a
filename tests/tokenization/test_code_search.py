"""Analysis-by-synthesis code search over an overlap-add decoder, against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenization.code_search import SHORTLIST, refine_codes


def decode(ids: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Ids (T, K) -> spans (T, bins, S): each code adds its three taps to spans t-1, t, t+1;
    a ``-1`` adds nothing."""
    out = bias.expand(ids.shape[0], *bias.shape).clone()
    for t, k in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        code = int(ids[t, k])
        if code < 0:
            continue
        for tap, span in enumerate((t - 1, t, t + 1)):
            if 0 <= span < ids.shape[0]:
                out[span] += tables[k, code, tap]
    return out


def l1(ids: torch.Tensor, tables, bias, target, valid) -> float:
    return float(((decode(ids, tables, bias) - target).abs() * valid).sum())


def problem(codebooks: int, codes: int, length: int = 10, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    tables = torch.randn(codebooks, codes, 3, 3, 2, generator=generator)
    bias = torch.randn(3, 2, generator=generator)
    target = torch.randn(length, 3, 2, generator=generator) * 2
    ids = torch.randint(0, codes, (length, codebooks), generator=generator)
    return tables, bias, target, ids


def search(ids, tables, bias, target, valid, sweeps) -> torch.Tensor:
    recon = decode(ids, tables, bias)
    return refine_codes(ids[None], recon[None], target[None], valid[None], tables, sweeps)[0]


@pytest.mark.parametrize("codebooks", [1, 2])
def test_search_ends_where_no_single_code_change_lowers_the_error(codebooks: int) -> None:
    codes = SHORTLIST - 2  # the shortlist holds every code: the search is exact
    tables, bias, target, start = problem(codebooks, codes)
    valid = torch.ones(len(target), 1, 2)
    found = search(start, tables, bias, target, valid, sweeps=20)
    best = l1(found, tables, bias, target, valid)
    assert best < 0.8 * l1(start, tables, bias, target, valid)
    for t, k, code in itertools.product(range(len(found)), range(codebooks), range(codes)):
        moved = found.clone()
        moved[t, k] = code
        assert l1(moved, tables, bias, target, valid) >= best - 1e-4, (t, k, code)


def test_each_sweep_lowers_the_error_or_keeps_it_with_more_codes_than_the_shortlist() -> None:
    tables, bias, target, ids = problem(1, 4 * SHORTLIST, length=16, seed=1)
    valid = torch.ones(16, 1, 2)
    errors = [l1(ids, tables, bias, target, valid)]
    for _ in range(4):
        ids = search(ids, tables, bias, target, valid, sweeps=1)
        errors.append(l1(ids, tables, bias, target, valid))
    assert all(b <= a + 1e-4 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.8 * errors[0], errors


def decode_grid(ids: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Ids (h, w, 1) -> cells (h, w, C, P): each code adds its nine taps to the 3 x 3 cells
    around its own (row-major offsets)."""
    h, w = ids.shape[:2]
    out = torch.zeros(h, w, *tables.shape[-2:])
    for i, j in itertools.product(range(h), range(w)):
        for tap, (di, dj) in enumerate(itertools.product((-1, 0, 1), repeat=2)):
            if 0 <= i + di < h and 0 <= j + dj < w:
                out[i + di, j + dj] += tables[0, int(ids[i, j, 0]), tap]
    return out


@pytest.mark.parametrize("power", [1, 2])
def test_on_a_grid_of_patches_the_search_ends_at_a_coordinate_optimum(power: int) -> None:
    generator = torch.Generator().manual_seed(2)
    tables = torch.randn(1, 6, 9, 2, 3, generator=generator)  # 6 codes: all are candidates
    target = torch.randn(5, 4, 2, 3, generator=generator) * 2
    start = torch.randint(0, 6, (5, 4, 1), generator=generator)
    valid = torch.ones(5, 4, 1, 3)

    def error(ids: torch.Tensor) -> float:
        return float((decode_grid(ids, tables) - target).abs().pow(power).sum())

    found = refine_codes(
        start[None], decode_grid(start, tables)[None], target[None], valid[None], tables, 20, power
    )[0]
    best = error(found)
    assert best < 0.8 * error(start)
    for i, j, code in itertools.product(range(5), range(4), range(6)):
        moved = found.clone()
        moved[i, j, 0] = code
        assert error(moved) >= best - 1e-3, (i, j, code)


def test_padding_keeps_its_ids_and_frames_outside_the_clip_do_not_count() -> None:
    tables, bias, target, ids = problem(1, 6)
    ids[8:] = -1  # past the clip's end
    valid = torch.ones(10, 1, 2)
    valid[7, :, 1:] = 0  # the clip ends inside span 7
    valid[8:] = 0
    found = search(ids, tables, bias, target, valid, sweeps=3)
    assert (found[8:] == -1).all() and (found[:8] >= 0).all()
    noisy = target.clone()
    noisy[7, :, 1:] = 1e3
    noisy[8:] = -1e3
    assert torch.equal(search(ids, tables, bias, noisy, valid, sweeps=3), found)


def test_no_sweeps_and_empty_clips_change_nothing() -> None:
    tables, bias, target, ids = problem(1, 6)
    valid = torch.ones(10, 1, 2)
    assert torch.equal(search(ids, tables, bias, target, valid, sweeps=0), ids)
    empty = torch.zeros(1, 0, 1, dtype=torch.long)
    spans = torch.zeros(1, 0, 3, 2)
    assert refine_codes(empty, spans, spans, spans[..., :1, :], tables, 2).shape == (1, 0, 1)
