"""Analysis-by-synthesis code search for a decoder that is linear in its codes.

A VQ-VAE's encoder picks, per token, the code nearest to its latent; that code is not the one
whose *decoded* output is closest to the input, since the decoder blends each token with its
neighbours. Speech codecs choose their codes by decoding the candidates and keeping the best
(CELP's analysis by synthesis); here that is exact and cheap because the audio tokenizer's
span path decodes by overlap-add: token ``t``'s code adds ``prev[c]`` to span ``t - 1``,
``own[c]`` to span ``t`` and ``next[c]`` to span ``t + 1``, whatever the other codes are.

:func:`refine_codes` is coordinate descent over the ids: positions three apart touch disjoint
spans, so each of the three residues mod 3 is re-chosen at once, one codebook at a time:
the :data:`SHORTLIST` codes with the least squared error (matrix products over the whole
codebook), then the least L1 error over the valid frames among them and the current code.
The whole is swept ``sweeps`` times. The error never rises: the current code is always a
candidate. Measured on the demo's held-out clips (fitted start, 3 seeds): mel-L1
0.1352/0.1361/0.1362 with the nearest code, 0.1317/0.1329/0.1321 after two sweeps (a third
changes < 1e-4); it costs about 12 ms of one CPU thread per second of audio with the demo's
tokenizer, against 2 ms for the nearest codes alone.
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """Ids whose decoded spans are closer (L1) to ``target`` than those of ``ids``.

    - ``ids`` (B, T, K): a code per position and codebook, ``-1`` past a clip's end (kept);
    - ``reconstruction`` (B, T, bins, span): the decoder's output for ``ids``, per span;
    - ``target`` (B, T, bins, span) and ``valid`` (B, T, 1, span), 1 on frames that count;
    - ``tables`` (K, V, 3, bins, span): what code ``c`` of codebook ``k`` at position ``t``
      adds to spans ``t - 1``, ``t`` and ``t + 1``.

    Returns new ids (B, T, K); the reconstruction of the new ids is ``reconstruction`` plus
    the table differences (the rest of the decoder is held where ``ids`` put it).
    """
    ids, recon = ids.clone(), reconstruction.detach().float().clone()
    target, valid, tables = target.float(), valid.float(), tables.float()
    length = ids.shape[1]
    if length == 0:
        return ids
    for _ in range(sweeps):
        for residue in range(min(3, length)):
            for k in range(ids.shape[2]):
                positions = torch.arange(residue, length, 3, device=ids.device)
                _refine_positions(ids, recon, target, valid, tables[k], positions, k)
    return ids


def _refine_positions(
    ids: torch.Tensor,
    recon: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    k: int,
) -> None:
    """Re-choose codebook ``k``'s code at ``positions`` (three apart) in place."""
    length = ids.shape[1]
    current = ids[:, positions, k]  # (B, n)
    active = current >= 0
    safe = current.clamp_min(0)
    flat = table.flatten(2)  # (V, 3, bins * S)
    energy = table.pow(2).sum(-2)  # (V, 3, S)
    taps = []
    squared = recon.new_zeros(*current.shape, table.shape[0])  # (B, n, V), up to a constant
    for tap, offset in enumerate((-1, 0, 1)):
        span = positions + offset
        inside = ((span >= 0) & (span < length)).to(recon.dtype)[None, :, None]
        span = span.clamp(0, length - 1)
        weight = valid[:, span] * inside[..., None]  # (B, n, 1, S)
        # What the other codes leave unexplained: sum_f w (residual + t_c)^2 per candidate c
        # is 2 <w residual, t_c> + <w, t_c^2> plus a constant.
        residual = recon[:, span] - table[safe, tap] - target[:, span]  # (B, n, bins, S)
        squared += 2 * (weight * residual).flatten(2) @ flat[:, tap].T
        squared += weight.flatten(2) @ energy[:, tap].T
        taps.append((span, tap, inside[..., None], weight, residual))
    shortlist = squared.topk(min(SHORTLIST, table.shape[0]), largest=False).indices
    candidates = torch.cat([safe[..., None], shortlist], dim=-1)  # (B, n, M + 1)
    errors = recon.new_zeros(candidates.shape)
    for _, tap, _, weight, residual in taps:
        decoded = residual.unsqueeze(2) + table[candidates, tap]  # (B, n, M + 1, bins, S)
        errors += (decoded.abs() * weight.unsqueeze(2)).sum((-2, -1))
    best = candidates.gather(-1, errors.argmin(-1, keepdim=True)).squeeze(-1)
    chosen = torch.where(active, best, current)
    for span, tap, inside, _, _ in taps:
        change = table[chosen.clamp_min(0), tap] - table[safe, tap]  # (B, n, bins, S)
        recon.index_add_(1, span, change * active[..., None, None] * inside)
    ids[:, positions, k] = chosen
