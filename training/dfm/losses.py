"""Training losses of discrete flow matching; both return sums, the caller normalises.

``cross_entropy_sum`` is the paper's ``L_ce``: the clean ids' cross-entropy under the head
(x-prediction) at the corrupted response positions, summed.

``generalized_kl_sum`` is the generalized KL between the conditional velocity of a mixture
path and the model's (Shaul et al., "Flow Matching with General Discrete Paths",
arXiv 2412.03487; ``MixturePathGeneralizedKL`` of facebookresearch/flow_matching). Per
position, with ``w = dkappa_t / (1 - kappa_t)``, ``delta = [x_t = x1]``:

    l = -w (p_{1|t}(x_t) - delta + (1 - delta) log p_{1|t}(x1)) >= 0,

zero exactly when ``p_{1|t} = delta_{x1}``. ``p_{1|t}(x_t) = 0`` when ``x_t`` is not a clean
token of the head (``<MASK>``, written as a negative local id): on the masked path the loss
is then ``w`` times the cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.dfm.mixture_paths import per_position
from training.dfm.schedulers import MixtureScheduler


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy, computed in float32: ``logits`` Float[N, V], ``targets`` Long[N]."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def generalized_kl_sum(
    logits: Tensor,
    targets: Tensor,
    xt_local: Tensor,
    t: Tensor | float,
    scheduler: MixtureScheduler,
) -> Tensor:
    """Summed generalized KL of a mixture path (see the module docstring).

    ``logits``: Float[N, V] of the head; ``targets``: Long[N] clean local ids; ``xt_local``:
    Long[N] local ids of the corrupted tokens, negative for ``<MASK>`` (as
    ``MaskedPath.local_state`` writes it); ``t``: Float[] or Float[N].
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_p_x1 = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    is_clean_state = xt_local >= 0
    p_xt = log_p.gather(-1, xt_local.clamp_min(0).unsqueeze(-1)).squeeze(-1).exp()
    p_xt = torch.where(is_clean_state, p_xt, 0.0)
    delta = (xt_local == targets).float()
    rate = scheduler.jump_rate(per_position(t, targets))
    return -(rate * (p_xt - delta + (1 - delta) * log_p_x1)).sum()
