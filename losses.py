"""Losses of MlTr, Section 3.2 of the paper, one function per equation.

Guide (paper -> code):
  Eq. (12) BCE_i = -sum_j y log p - sum_j (1 - y) log(1 - p) ...... bce_loss
  Eq. (14) ASL_i = -sum_j y L+ - sum_j (1 - y) L- ................. asymmetric_loss
  Eq. (15) L+ = (1 - p)^g+ log p .................................. asl_positive
  Eq. (16) L- = p_m^g- log(1 - p_m), p_m = max(p - m, 0) .......... asl_negative
  Eq. (17) OTL_i = -log s_z, s = softmax(count logits) ............ object_token_loss
  Eq. (18) L_i = ASL_i + OTL_i, averaged over the batch ........... mitr_loss (what train.py calls)

Every function starts from the head's logits z (Eq. 11/13 live in mitr.py: mitr.ArcHead):
p = sigmoid(z), and log p = logsigmoid(z), log(1 - p) = logsigmoid(-z) are computed without
forming 1 - p, so logits of +-100 give exact, finite losses and gradients.

Targets y are (N, n): 1 present, 0 absent, -1 ignored (a VOC "difficult" label). An ignored entry
is in neither sum of Eqs. (12)/(14) and is not counted in Eq. (17)'s z.
Defaults are Section 4.1's: m = 0.05, gamma_pos = 0, gamma_neg = 4 (s = 8 belongs to the head).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def bce_loss(logits, y):
    """BCE_i of Eq. (12) per sample, (N,), from logits (N, n) and targets y (N, n)."""
    present = (y == 1).to(logits.dtype)  # the y of Eq. (12); 0 where y = -1
    absent = (y == 0).to(logits.dtype)  # the 1 - y of Eq. (12); 0 where y = -1
    log_p = F.logsigmoid(logits)  # log p, p = sigmoid(z) of Eq. (11) / Eq. (13)
    log_1_minus_p = F.logsigmoid(-logits)
    return -(present * log_p).sum(-1) - (absent * log_1_minus_p).sum(-1)  # Eq. (12)


def asl_positive(logits, gamma_pos=0.0, *, detach_focus=True):
    """L+ of Eq. (15) per entry, (N, n). detach_focus: see asymmetric_loss."""
    # L+ = (1 - p)^g+ log p, with 1 - p = sigmoid(-z).
    focus = torch.sigmoid(-logits).pow(gamma_pos)
    if detach_focus:
        focus = focus.detach()
    return focus * F.logsigmoid(logits)  # Eq. (15)


def asl_negative(logits, gamma_neg=4.0, m=0.05, *, detach_focus=True):
    """L- of Eq. (16) per entry, (N, n). detach_focus: see asymmetric_loss.

    Paper: L- = (p - m)^g- log(1 - p + m). Here: p_m = max(p - m, 0), L- = p_m^g- log(1 - p_m),
    ASL's shifted probability; as printed, an easy negative (p < m) would get a negative loss, or
    NaN for a non-integer g- (Interpretation 11). For p >= m both forms agree.
    """
    # The shifted probability p_m = max(p - m, 0) and the focusing weight p_m^g-.
    p_m = (torch.sigmoid(logits) - m).clamp(min=0.0)  # p of Eq. (11) / Eq. (13), shifted
    focus = p_m.pow(gamma_neg)
    if detach_focus:
        focus = focus.detach()
    # log(1 - p_m) = log(min(1 - p + m, 1)) = min(log(1 - p + m), 0), and log(1 - p + m) is
    # logaddexp(log(1 - p), log m) with log(1 - p) = logsigmoid(-z): 1 - p is never formed (in
    # float32 it is 0 above z = 16.6, and m = 0, the BCE limit, would then give log 0).
    log_1_minus_p_plus_m = torch.logaddexp(F.logsigmoid(-logits), torch.log(logits.new_tensor(m)))
    log_1_minus_p_m = log_1_minus_p_plus_m.clamp(max=0.0)
    return focus * log_1_minus_p_m  # Eq. (16)


def asymmetric_loss(logits, y, gamma_pos=0.0, gamma_neg=4.0, m=0.05, *, detach_focus=True):
    """ASL_i of Eq. (14) per sample, (N,), from logits (N, n) and targets y (N, n).

    Paper: silent on whether the focusing weights (1 - p)^g+ and p_m^g- carry gradient. Here: by
    default they are constants of the backward pass (detach_focus=True; the value is the same), as
    in the training script of ASL [29], whose recipe Section 4.1 takes (Interpretation 12).
    """
    present = (y == 1).to(logits.dtype)  # the y of Eq. (14); 0 where y = -1
    absent = (y == 0).to(logits.dtype)  # the 1 - y of Eq. (14); 0 where y = -1
    L_pos = asl_positive(logits, gamma_pos, detach_focus=detach_focus)  # (N, n)
    L_neg = asl_negative(logits, gamma_neg, m, detach_focus=detach_focus)  # (N, n)
    return -(present * L_pos).sum(-1) - (absent * L_neg).sum(-1)  # Eq. (14)


def object_token_loss(count_logits, y):
    """OTL_i of Eq. (17) per sample, (N,), from count_logits (N, n + 1) and targets y (N, n).

    Paper: z = sum_{j=0}^{n} y_ij, and s also names the arc sigmoid's scale. Here: z counts the
    labels equal to 1 (0..n, so n + 1 count classes; an ignored -1 must not lower z) and s_z is
    the softmax output (Interpretation 13).
    """
    z = (y == 1).sum(-1)  # (N,) in 0..n
    return F.cross_entropy(count_logits, z, reduction="none")  # Eq. (17): -log softmax(.)_z


class MitrLoss(NamedTuple):
    """What mitr_loss returns: the loss to backpropagate and its two parts for the log."""

    loss: torch.Tensor  # 0-d: the batch mean of L_i
    parts: dict  # {"asl": mean ASL_i, "otl": mean OTL_i}, detached 0-d tensors (no host sync)


def _at_least_float32(t):
    """fp16 and bf16 as float32 (half-precision losses give NaN, ASL's advice); float64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mitr_loss(
    class_logits, count_logits, y, gamma_pos=0.0, gamma_neg=4.0, m=0.05, *, detach_focus=True
):
    """Eq. (18) averaged over the batch, as a MitrLoss(loss, parts).

    class_logits (B, n), the head's s cos theta; count_logits (B, n + 1), or None for a model
    without the object-aware token (OTL = 0); y (B, n) in {1, 0, -1}.
    Paper: L_i per sample, the batch reduction unstated. Here: the mean over the batch, so the
    logged value does not depend on the batch size; ASL's code sums (Interpretation 14).
    """
    class_logits = _at_least_float32(class_logits)
    asl = asymmetric_loss(class_logits, y, gamma_pos, gamma_neg, m, detach_focus=detach_focus)
    if count_logits is None:
        otl = torch.zeros_like(asl)
    else:
        otl = object_token_loss(_at_least_float32(count_logits), y)
    L = asl + otl  # Eq. (18), (B,)
    parts = {"asl": asl.detach().mean(), "otl": otl.detach().mean()}
    return MitrLoss(L.mean(), parts)
