"""Analysis-by-synthesis code search for a decoder that is linear in its codes.

A VQ-VAE's encoder picks, per token, the code nearest to its latent; that code is not the one
whose *decoded* output is closest to the input, since the decoder blends each token with its
neighbours. Speech codecs choose their codes by decoding the candidates and keeping the best
(CELP's analysis by synthesis); here that is exact and cheap because the tokenizers' linear
paths decode by overlap-add: an audio token's code adds a fixed pattern to its own span and
to the spans before and after it, an image token's to its own patch and the 8 around it,
whatever the other codes are.

:func:`refine_codes` is coordinate descent over the ids: positions three apart (in some
dimension) touch disjoint cells, so each residue class mod 3 is re-chosen at once, one
codebook at a time, and the whole is swept ``sweeps`` times. Squared error scores every code
exactly (two matrix products over the codebook; the images, PSNR's error); for L1 (the
audio, mel-L1's) the :data:`SHORTLIST` best by squared error and the current code are scored
exactly. The error never rises: the current code is always a candidate.

Measured on the demo's held-out media (fitted start): audio mel-L1 0.1352/0.1361/0.1362 with
the nearest code, 0.1317/0.1329/0.1321 after two sweeps (3 seeds; a third sweep changes
< 1e-4), about 12 ms of one CPU thread per second of audio against 2 ms; image PSNR
21.62/21.54 dB -> 22.04/21.91 dB (2 seeds), encoding about twice as long.
"""

from __future__ import annotations

import itertools
import math

import torch

# Candidates whose exact L1 error is computed per position: the best by squared error (two
# matrix products over the whole codebook), plus the current code. On the demo's held-out
# clips 8 give the same mel-L1 as all 128 codes to 1e-4, at a tenth of the time.
SHORTLIST = 8


def refine_codes(
    ids: torch.Tensor,
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    tables: torch.Tensor,
    sweeps: int,
    power: int = 1,
) -> torch.Tensor:
    """Ids whose decoded cells are closer to ``target`` than those of ``ids``, by the sum of
    ``|error| ** power`` (1 or 2) over the valid values.

    The codes lie on a grid of one or two dimensions (token spans of a clip, patches of an
    image); a code adds to its own cell and to each neighbour one step away in every
    dimension (3 cells in 1-D, 3 x 3 in 2-D):

    - ``ids`` (B, *grid, K): a code per position and codebook, ``-1`` past a clip's end (kept);
    - ``reconstruction`` (B, *grid, C, P): the decoder's output for ``ids``, per cell;
    - ``target`` (B, *grid, C, P) and ``valid`` (B, *grid, 1, P), 1 on values that count;
    - ``tables`` (K, V, 3 ** len(grid), C, P): what code ``c`` of codebook ``k`` adds to each
      neighbour cell, neighbours in row-major order of their offsets (-1, 0, 1) per dimension.

    With ``power`` 2 every code is scored exactly (two matrix products); with 1 the
    :data:`SHORTLIST` best by squared error and the current code are. Returns new ids
    (B, *grid, K); the rest of the decoder is held where ``ids`` put it.
    """
    grid, shape = tuple(ids.shape[1:-1]), ids.shape
    cells = math.prod(grid)
    if cells == 0:
        return ids.clone()
    ids = ids.clone().reshape(shape[0], cells, shape[-1])
    recon = reconstruction.detach().float().reshape(ids.shape[0], cells, *target.shape[-2:])
    target = target.float().reshape(recon.shape)
    valid = valid.float().reshape(ids.shape[0], cells, 1, -1)
    tables = tables.float()
    coordinates = torch.stack(
        torch.meshgrid(*[torch.arange(n, device=ids.device) for n in grid], indexing="ij"), -1
    ).reshape(cells, len(grid))  # (cells, dims)
    offsets = list(itertools.product((-1, 0, 1), repeat=len(grid)))
    neighbours = []  # per tap: (flat index clamped into the grid, inside the grid)
    for offset in offsets:
        moved = coordinates + torch.tensor(offset, device=ids.device)
        inside = ((moved >= 0) & (moved < torch.tensor(grid, device=ids.device))).all(-1)
        flat = torch.zeros(cells, dtype=torch.long, device=ids.device)
        for axis, size in enumerate(grid):
            flat = flat * size + moved[:, axis].clamp(0, size - 1)
        neighbours.append((flat, inside))
    groups = [
        torch.nonzero(((coordinates % 3) == torch.tensor(r, device=ids.device)).all(-1))[:, 0]
        for r in itertools.product(range(3), repeat=len(grid))
    ]  # positions three apart in some dimension touch disjoint cells
    for _ in range(sweeps):
        for positions in groups:
            for k in range(ids.shape[2]):
                if len(positions):
                    _refine_positions(
                        ids, recon, target, valid, tables[k], positions, k, neighbours, power
                    )
    return ids.reshape(shape)


def _refine_positions(
    ids: torch.Tensor,
    recon: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    k: int,
    neighbours: list[tuple[torch.Tensor, torch.Tensor]],
    power: int,
) -> None:
    """Re-choose codebook ``k``'s code at ``positions`` (cells (B, cells, C, P)) in place."""
    current = ids[:, positions, k]  # (B, n)
    active = current >= 0
    safe = current.clamp_min(0)
    flat = table.flatten(2)  # (V, taps, C * P)
    energy = table.pow(2).sum(-2)  # (V, taps, P)
    taps = []
    squared = recon.new_zeros(*current.shape, table.shape[0])  # (B, n, V), up to a constant
    for tap, (cell, inside) in enumerate(neighbours):
        cell = cell[positions]
        inside = inside[positions].to(recon.dtype)[None, :, None, None]  # (1, n, 1, 1)
        weight = valid[:, cell] * inside  # (B, n, 1, P)
        # What the other codes leave unexplained: sum w (residual + t_c)^2 per candidate c
        # is 2 <w residual, t_c> + <w, t_c^2> plus a constant.
        residual = recon[:, cell] - table[safe, tap] - target[:, cell]  # (B, n, C, P)
        squared += 2 * (weight * residual).flatten(2) @ flat[:, tap].T
        squared += weight.flatten(2) @ energy[:, tap].T
        taps.append((cell, tap, inside, weight, residual))
    if power == 2:
        best = squared.argmin(-1)
    else:
        shortlist = squared.topk(min(SHORTLIST, table.shape[0]), largest=False).indices
        candidates = torch.cat([safe[..., None], shortlist], dim=-1)  # (B, n, M + 1)
        errors = recon.new_zeros(candidates.shape)
        for _, tap, _, weight, residual in taps:
            decoded = residual.unsqueeze(2) + table[candidates, tap]  # (B, n, M + 1, C, P)
            errors += (decoded.abs() * weight.unsqueeze(2)).sum((-2, -1))
        best = candidates.gather(-1, errors.argmin(-1, keepdim=True)).squeeze(-1)
    chosen = torch.where(active, best, current)
    for cell, tap, inside, _, _ in taps:
        change = table[chosen.clamp_min(0), tap] - table[safe, tap]  # (B, n, C, P)
        recon.index_add_(1, cell, change * active[..., None, None] * inside)
    ids[:, positions, k] = chosen
