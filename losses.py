"""Losses of MlTr, Section 3.2 of the paper, one function per equation.

Guide (paper -> code):
  Eq. (12) BCE_i = -sum_j y log p - sum_j (1 - y) log(1 - p) ...... bce_loss
  Eq. (14) ASL_i = -sum_j y L+ - sum_j (1 - y) L- ................. asymmetric_loss
  Eq. (15) L+ = (1 - p)^g+ log p .................................. asl_positive
  Eq. (16) L- = p_m^g- log(1 - p_m), p_m = max(p - m, 0) .......... asl_negative
  Eq. (17) OTL_i = -log s_z, s = softmax(count logits) ............ object_token_loss
  Eq. (18) L_i = ASL_i + OTL_i, averaged over the batch ........... mitr_loss (what train.py calls)

Where p comes from. Eq. (11) (linear head) and Eq. (13) (the arc sigmoid, p = sigmoid(s cos theta))
are the model's last layer and live in mitr.py only (mitr.arc_logits, mitr.ArcHead, with the note
on the sign printed in Eqs. 11/13). Every function here starts from that head's logits z:
p = sigmoid(z) is Eq. 11/13's p, and log p = logsigmoid(z), log(1 - p) = logsigmoid(-z) are
computed without forming 1 - p, so logits of +-100 give exact, finite losses and gradients.

Targets y are (N, n) with 1 = present, 0 = absent, -1 = ignore (a VOC "difficult" label): an ignored
entry is neither a "y" nor a "1 - y" term of Eqs. (12)/(14) and is not counted in Eq. (17)'s z.
Defaults are Section 4.1's: m = 0.05, gamma_pos = 0, gamma_neg = 4 (s = 8 belongs to the head).
"""

import torch
import torch.nn.functional as F


def _y_and_1_minus_y(y, like):
    """The y and (1 - y) of Eqs. (12)/(14), (N, n) in like's dtype, both 0 where y = -1."""
    y = y.to(like.dtype)
    keep = (y != -1).to(like.dtype)
    return keep * y, keep * (1 - y)


def bce_loss(logits, y):
    """BCE_i of Eq. (12) per sample, (N,), from logits (N, n) and targets y (N, n)."""
    y_pos, y_neg = _y_and_1_minus_y(y, logits)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    return -(y_pos * log_p).sum(-1) - (y_neg * log_1mp).sum(-1)  # Eq. (12)


def asl_positive(logits, gamma_pos=0.0, *, detach_focus=True):
    """L+ of Eq. (15) per entry, (N, n). detach_focus: see asymmetric_loss."""
    w = torch.sigmoid(-logits).pow(gamma_pos)  # (1 - p)^g+, the focusing weight
    return (w.detach() if detach_focus else w) * F.logsigmoid(logits)  # Eq. (15)


def asl_negative(logits, gamma_neg=4.0, m=0.05, *, detach_focus=True):
    """L- of Eq. (16) per entry, (N, n). detach_focus: see asymmetric_loss.

    Paper: L- = (p - m)^g- log(1 - p + m).  Here: p_m = max(p - m, 0), L- = p_m^g- log(1 - p_m),
    because as printed, for p < m the base p - m is negative (NaN for a non-integer g-, a positive
    weight for g- = 4 where none is meant) and log(1 - p + m) > 0, so an easy negative would get a
    negative loss; ASL [29] defines the shifted probability p_m = max(p - m, 0) (its code:
    (1 - p + m).clamp(max=1)). For p >= m both forms agree.
    """
    p_m = (torch.sigmoid(logits) - m).clamp(min=0.0)
    w = p_m.pow(gamma_neg)  # p_m^g-, the focusing weight
    # log(1 - p_m) = min(log(1 - p + m), 0), with log(1 - p + m) = logaddexp(log(1 - p), log m)
    log_1m_pm = torch.logaddexp(F.logsigmoid(-logits), logits.new_tensor(m).log()).clamp(max=0.0)
    return (w.detach() if detach_focus else w) * log_1m_pm  # Eq. (16)


def asymmetric_loss(logits, y, gamma_pos=0.0, gamma_neg=4.0, m=0.05, *, detach_focus=True):
    """ASL_i of Eq. (14) per sample, (N,), from logits (N, n) and targets y (N, n).

    Paper: Eqs. (15)-(16), silent on whether the focusing weights (1 - p)^g+ and p_m^g- carry
    gradient. Here: by default they are constants of the backward pass (detach_focus=True; the
    loss value is the same), because Section 4.1 takes g-, m and the rest of its recipe from ASL [29], whose
    training script, and the scripts derived from it, train with the weights detached
    (disable_torch_grad_focal_loss=True). detach_focus=False differentiates them as well.
    """
    y_pos, y_neg = _y_and_1_minus_y(y, logits)
    L_pos = asl_positive(logits, gamma_pos, detach_focus=detach_focus)  # (N, n)
    L_neg = asl_negative(logits, gamma_neg, m, detach_focus=detach_focus)  # (N, n)
    return -(y_pos * L_pos).sum(-1) - (y_neg * L_neg).sum(-1)  # Eq. (14)


def object_token_loss(count_logits, y):
    """OTL_i of Eq. (17) per sample, (N,): -log s_z, s = softmax(count_logits), count_logits (N, n + 1).

    Paper: z = sum_{j=0}^{n} y_ij, and "s" also names the arc-sigmoid scale. Here: z = sum_j [y_ij = 1]
    over the n classes (0..n, so the count head has n + 1 outputs) and s_z is the softmax output,
    because the classes are indexed 1..n in Eqs. (12)-(14) and an ignored y = -1 must not lower z.
    """
    z = (y == 1).sum(-1)  # (N,) in 0..n
    return F.cross_entropy(count_logits, z, reduction="none")  # Eq. (17): -log softmax(.)_z


def mitr_loss(
    class_logits, count_logits, y, gamma_pos=0.0, gamma_neg=4.0, m=0.05, *, detach_focus=True
):
    """Eq. (18) averaged over the batch: (loss, {"asl": mean ASL_i, "otl": mean OTL_i}).

    class_logits (B, n), the head's s cos theta; count_logits (B, n + 1), or None for a model without
    the object-aware token (OTL = 0); y (B, n) in {1, 0, -1}. Half-precision logits are cast to
    float32 first (fp16 losses give NaN, ASL's advice); float64 stays float64.

    Paper: L_i per sample, the batch reduction unstated. Here: the mean over the batch of L_i, each
    L_i the sum over classes as Eqs. (12)/(14) write it, because it keeps the logged value
    independent of the batch size. ASL's code returns the SUM over batch and classes (B times ours);
    Adam is invariant to a constant loss scale up to its eps, except against its coupled L2
    weight_decay, which with ASL's sum is B times weaker relative to the data term.
    """

    def fp32(t):
        return t.to(torch.promote_types(t.dtype, torch.float32))

    asl = asymmetric_loss(fp32(class_logits), y, gamma_pos, gamma_neg, m, detach_focus=detach_focus)
    otl = (
        torch.zeros_like(asl) if count_logits is None else object_token_loss(fp32(count_logits), y)
    )
    L = asl + otl  # Eq. (18), (B,)
    asl_mean, otl_mean = torch.stack(
        [asl.detach().mean(), otl.detach().mean()]
    ).tolist()  # one host sync
    return L.mean(), {"asl": asl_mean, "otl": otl_mean}
