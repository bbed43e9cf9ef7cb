"""Losses of MlTr, Section 3.2 of the paper, one function per equation.

Guide (paper -> code):
  Eq. (11) p = sigmoid(x W_j^T + b_j), linear head ........... linear_sigmoid
  Eq. (12) BCE_i, binary cross-entropy summed over classes ... bce_loss
  Eq. (13) p = sigmoid(s cos theta), the "arc sigmoid" ....... arc_sigmoid (arc_logits = s cos theta)
  Eq. (14) ASL_i = -sum_j y L+ - sum_j (1 - y) L- ............ asymmetric_loss
  Eq. (15) L+ = (1 - p)^g+ log p ............................. asymmetric_loss
  Eq. (16) L- = p_m^g- log(1 - p_m), p_m = max(p - m, 0) ..... asymmetric_loss
  Eq. (17) OTL_i = -log softmax(count_logits)_z, z = #labels . object_token_loss
  Eq. (18) L_i = ASL_i + OTL_i, then the batch mean .......... mitr_loss (what train.py calls)

Defaults are Section 4.1's: s = 8, m = 0.05, gamma_pos = 0, gamma_neg = 4.

Targets y are (N, n) with 1 = present, 0 = absent, -1 = ignore; an ignored entry contributes
nothing to any loss here (it is neither a "y" nor a "1 - y" term of Eq. 12/14).

Numerics. Every loss takes either probabilities p (literal, as the paper writes it; log p is
clamped at eps = 1e-8 like ASL, so p in {0, 1} stays finite) or, keyword `logits=`, the
pre-sigmoid scores, from which p, 1 - p, log p and log(1 - p) are computed in log-sigmoid form
(no cancellation in 1 - p, exact for logits of +-100). mitr_loss always uses the logit form.
"""

import torch
import torch.nn.functional as F

EPS = 1e-8  # floor inside log() on the probability path, as ASL's code


def _check_targets(y, like):
    """y as a tensor of like's dtype/device and shape (N, n), values in {-1, 0, 1}; else ValueError."""
    y = torch.as_tensor(y, device=like.device)
    if y.shape != like.shape:
        raise ValueError(f"targets have shape {tuple(y.shape)}, scores have {tuple(like.shape)}; "
                         "they must match (N, n)")
    if not bool(((y == 1) | (y == 0) | (y == -1)).all()):
        raise ValueError("targets must be 1 (present), 0 (absent) or -1 (ignore); got other values")
    return y.to(like.dtype)


def _sigmoid_parts(p, logits):
    """(p, q = 1 - p, log p, log q) from probabilities p, or stably from logits when given."""
    if logits is not None:
        return torch.sigmoid(logits), torch.sigmoid(-logits), F.logsigmoid(logits), F.logsigmoid(-logits)
    q = 1.0 - p
    return p, q, torch.log(p.clamp(min=EPS)), torch.log(q.clamp(min=EPS))


def linear_sigmoid(x, weight, bias):
    """p (N, n) of a linear head. x (N, d); weight (n, d), row j is W_j (nn.Linear layout); bias (n,).

    Paper: p = 1 / (1 + e^{+(x_i W_j^T + b_j)}).  Here: p = 1 / (1 + e^{-(x_i W_j^T + b_j)}) =
    sigmoid(x_i W_j^T + b_j), because as printed p falls as the product rises, contradicting the
    text ("when the product of x_i and W_j reaches the maximum, we label the i-th sample as the
    j-th class"); the printed form only equals ours after W, b -> -W, -b.  The paper also writes
    b_j in R^d; it is a scalar per class (b in R^n).
    """
    return torch.sigmoid(F.linear(x, weight, bias))  # Eq. (11), (N, d) @ (d, n) + (n,) -> (N, n)


def bce_loss(p, y, *, logits=None):
    """BCE_i of Eq. (12) per sample, (N,): -sum_j y log p - sum_j (1 - y) log(1 - p)."""
    ref = logits if logits is not None else p
    y = _check_targets(y, ref)
    y_pos, y_neg = (y == 1).to(ref.dtype), (y == 0).to(ref.dtype)  # y and 1 - y, zero where y = -1
    _, _, log_p, log_q = _sigmoid_parts(p, logits)
    return -(y_pos * log_p).sum(-1) - (y_neg * log_q).sum(-1)  # Eq. (12)


def arc_logits(x, weight, s=8.0):
    """s cos(theta_ij) (N, n), the exponent of Eq. (13). x (N, d); weight (n, d), row j is W_j.

    cos(theta_ij) = x_i W_j^T / (|x_i| |W_j|); a zero vector gets cos = 0 (F.normalize's eps), so
    the logit lies in [-s, s] and p = sigmoid(logit) in [sigmoid(-8), sigmoid(8)] = [3.4e-4, 0.99966].
    """
    cos = F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).t()  # (N, d) @ (d, n) -> (N, n)
    return s * cos


def arc_sigmoid(x, weight, s=8.0):
    """The arc sigmoid, p (N, n) of Eq. (13), from features x (N, d) and class weights (n, d).

    Paper: p = 1 / (1 + e^{+s cos theta}).  Here: p = sigmoid(+s cos theta), because as printed p
    would fall as the angle to the class vector shrinks (same sign typo as Eq. 11); the printed
    form only equals ours after W -> -W.  The paper's "keep the predicted value within [-s, s]"
    refers to the logit s cos theta, not to p.
    """
    return torch.sigmoid(arc_logits(x, weight, s))  # Eq. (13)


def asymmetric_loss(p, y, gamma_pos=0.0, gamma_neg=4.0, m=0.05, *, logits=None, detach_focus=False):
    """ASL_i of Eqs. (14)-(16) per sample, (N,). p, y (N, n); or p=None and logits=(N, n).

    detach_focus=True computes the focusing weights (1 - p)^g+ and p_m^g- without gradient, as
    ASL's training script does (disable_torch_grad_focal_loss=True); the default differentiates the
    equation as written.
    """
    ref = logits if logits is not None else p
    y = _check_targets(y, ref)
    y_pos, y_neg = (y == 1).to(ref.dtype), (y == 0).to(ref.dtype)  # y and 1 - y, zero where y = -1
    p, q, log_p, log_q = _sigmoid_parts(p, logits)  # q = 1 - p

    # Eq. (15): L+ = (1 - p)^g+ log p.  (A power of 0 is skipped: its gradient at 0 would be 0 * inf.)
    w_pos = q.pow(gamma_pos) if gamma_pos != 0 else torch.ones_like(q)
    L_pos = (w_pos.detach() if detach_focus else w_pos) * log_p  # Eq. (15)

    # Eq. (16).  Paper: L- = (p - m)^g- log(1 - p + m).  Here: p_m = max(p - m, 0),
    # L- = p_m^g- log(1 - p_m), because as printed, for p < m the base p - m is negative (NaN for a
    # non-integer g-, and a positive weight for g- = 4 where none is meant) and log(1 - p + m) > 0,
    # so an easy negative would get a negative loss; ASL [29] defines the shifted probability
    # p_m = max(p - m, 0) (its code: (1 - p + m).clamp(max=1)).  For p >= m both forms agree.
    p_m = (p - m).clamp(min=0.0)
    log_1m_pm = torch.log((q + m).clamp(max=1.0)) if m > 0 else log_q  # log(1 - p_m) = log min(1 - p + m, 1)
    w_neg = p_m.pow(gamma_neg) if gamma_neg != 0 else torch.ones_like(p_m)
    L_neg = (w_neg.detach() if detach_focus else w_neg) * log_1m_pm  # Eq. (16)

    return -(y_pos * L_pos).sum(-1) - (y_neg * L_neg).sum(-1)  # Eq. (14)


def object_token_loss(count_logits, y):
    """OTL_i of Eq. (17) per sample, (N,): -log s_z with s = softmax(count_logits), (N, n + 1).

    z = number of labels with y == 1 (0..n, so the count head has n + 1 outputs); ignored labels
    (-1) are not counted.  Paper: z = sum_{j=0}^{n} y_ij, and "s" also names the arc-sigmoid scale.
    Here: z = sum_j [y_ij = 1] over the n classes, and s_z is the softmax output, because the
    classes are indexed 1..n in Eqs. (12)-(14) and y = -1 must not lower the count.
    """
    N, n = count_logits.shape[0], count_logits.shape[-1] - 1
    if count_logits.dim() != 2 or tuple(torch.as_tensor(y).shape) != (N, n):
        raise ValueError(f"count_logits must be (N, n + 1) for targets (N, n); got count_logits "
                         f"{tuple(count_logits.shape)} and targets {tuple(torch.as_tensor(y).shape)}")
    y = _check_targets(y, count_logits[:, 1:])
    z = (y == 1).sum(-1).to(device=count_logits.device)  # (N,) in 0..n
    return -F.log_softmax(count_logits, dim=-1).gather(1, z[:, None]).squeeze(1)  # Eq. (17)


def mitr_loss(class_logits, count_logits, y, gamma_pos=0.0, gamma_neg=4.0, m=0.05, *, detach_focus=False):
    """Eq. (18) averaged over the batch: (loss, {"asl": mean ASL_i, "otl": mean OTL_i}).

    class_logits (B, n) with p = sigmoid(class_logits) (the model's s cos theta, or x W^T + b);
    count_logits (B, n + 1) or None (no object-aware token: OTL = 0); y (B, n) in {1, 0, -1}.
    Half-precision inputs are cast to float32 first (ASL's advice: fp16 losses give NaN); float64
    stays float64.

    Reduction: the mean over samples of L_i, each L_i being the sum over classes as Eqs. (12)/(14)
    write it.  ASL's code returns the SUM over batch and classes, i.e. B times ours.  Adam's update
    is invariant to a constant loss scale (up to its eps), so the choice barely matters -- except
    against torch.optim.Adam's coupled L2 weight_decay, which is added to the gradient: with ASL's
    sum the same weight_decay is B times weaker relative to the data term than with this mean.
    The mean keeps the logged value independent of the batch size.
    """
    def up(t):
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    class_logits = up(class_logits)
    asl = asymmetric_loss(None, y, gamma_pos, gamma_neg, m, logits=class_logits, detach_focus=detach_focus)  # (B,)
    if count_logits is None:
        otl = torch.zeros_like(asl)
    else:
        otl = object_token_loss(up(count_logits).to(asl.dtype), y)  # (B,)
    L = asl + otl  # Eq. (18), per sample (B,)
    asl_mean, otl_mean = torch.stack([asl.detach().mean(), otl.detach().mean()]).tolist()  # one host sync
    return L.mean(), {"asl": asl_mean, "otl": otl_mean}
