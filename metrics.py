"""Multi-label metrics of Section 4.1 (Tables 2-4) and Table 7, in percent, numpy only.

Inputs are (N, K) numpy arrays or torch tensors. Scores are the head's logits, not probabilities,
which saturate to 1.0 in float32 and tie (Interpretation 27). Targets are 1 present, 0 absent and
-1 ignored (VOC's difficult), left out of every metric (Interpretation 16). A threshold is a
probability t, scalar or per class (K,), applied as logit >= log(t / (1 - t)).

- AP is scikit-learn's (Interpretation 15): rank by descending score, tied scores forming one
  group; AP = the mean over the positives of the precision at the end of each one's group. A class
  without positives has AP NaN and is left out of every mean over classes, as of mAP.
  voc11=True gives the VOC2007 devkit's 11-point AP instead.
- CP and CR are means over the classes with positives of per-class precision (0 for a class never
  predicted) and recall; CF1 = 2 CP CR / (CP + CR) (Interpretation 17). OP, OR and OF1 pool the
  counts of all classes.
- AP_s, AP_m, AP_l (Table 7, Interpretation 18): for size c, the images where class k has size c
  against those without k; images with k at another size are left out.
"""

from typing import NamedTuple

import numpy as np

# MATLAB's 0:0.1:1, built as the devkit's MATLAB builds it: a + k d up to the middle, b - (n - k) d
# after it. Its 4th point is 3 * 0.1 = 0.30000000000000004, which a recall of exactly 0.3 misses.
_UP = [k * 0.1 for k in range(6)]  # 0, 0.1, ..., 0.5
_DOWN = [1 - k * 0.1 for k in range(4, -1, -1)]  # 0.6, ..., 1.0
VOC11_GRID = np.array(_UP + _DOWN)
SIZES = {1: "AP_s", 2: "AP_m", 3: "AP_l"}


class Thresholds(NamedTuple):
    """Probability thresholds chosen on labelled data (choose_thresholds)."""

    overall: float  # one threshold for every class, maximising CF1
    per_class: np.ndarray  # (K,), each maximising its class's F1; overall where no positive


class Ranking(NamedTuple):
    """Every class's images by descending score, tied scores grouped; (K, N) arrays."""

    order: np.ndarray  # the image at each rank
    scores: np.ndarray  # the score at each rank, descending
    group_start: np.ndarray  # the first rank of each rank's tie group
    group_end: np.ndarray  # the last rank of each rank's tie group


def logit(t):
    """Probability threshold(s) t in [0, 1] as logits log(t / (1 - t)): t = 0 -> -inf (every label
    predicted), t = 1 -> +inf (none)."""
    t = np.asarray(t, dtype=np.float64)
    if not np.all((t >= 0) & (t <= 1)):
        raise ValueError(f"thresholds must be probabilities in [0, 1]; got {t}")
    with np.errstate(divide="ignore"):
        return np.log(t / (1 - t))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _as_array(x):
    if hasattr(x, "detach"):  # a torch tensor (torch is not imported here); bf16 has no numpy dtype
        x = x.detach().cpu().double()
    return np.asarray(x)


def _scores(scores):
    """Scores as float64 (N, K) (thresholds then compare exactly); ValueError unless finite."""
    S = _as_array(scores).astype(np.float64)
    if not np.isfinite(S).all():
        i, k = np.argwhere(~np.isfinite(S))[0]
        raise ValueError(f"scores contain NaN or inf (first at sample {i}, class {k})")
    return S


def _targets(targets, shape, what):
    """Targets as numpy; ValueError unless they are (N, K) like `what` and hold 1, 0 or -1."""
    T = _as_array(targets)
    if len(shape) != 2 or T.shape != shape:
        raise ValueError(f"{what} {shape} and targets {T.shape} must both be (N, K)")
    if not np.isin(T, (1, 0, -1)).all():
        raise ValueError("targets must be 1 (present), 0 (absent) or -1 (ignore); got other values")
    return T


def _sizes(sizes, shape):
    Z = _as_array(sizes)
    if Z.shape != shape or not np.isin(Z, (0, 1, 2, 3)).all():
        raise ValueError(
            f"sizes must have the targets' shape {shape} and values 0 (absent), "
            "1 (small), 2 (medium) or 3 (large)"
        )
    return Z


def _rank(S):
    """The Ranking of scores S (N, K), every class at once."""
    S = np.ascontiguousarray(S.T)  # (K, N): one row per class
    order = np.argsort(-S, axis=1)  # any order inside a tie: ties are grouped below
    s = np.take_along_axis(S, order, axis=1)
    K, N = s.shape
    # A rank starts a tie group when its score differs from the one above; the rank before a
    # start ends a group.
    starts = np.ones((K, N), bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = np.ones((K, N), bool)
    ends[:, :-1] = starts[:, 1:]
    # Number the groups of all rows in reading order; each rank looks up its group's first and
    # last position, as flat indices into (K, N), then made ranks within the row.
    group = np.cumsum(starts) - 1  # (K * N,)
    row_offset = N * np.arange(K)[:, None]
    group_start = np.flatnonzero(starts)[group].reshape(K, N) - row_offset
    group_end = np.flatnonzero(ends)[group].reshape(K, N) - row_offset
    return Ranking(order, s, group_start, group_end)


def _in_rank_order(T, ranking):
    """Targets T (N, K) as (K, N), each class's row in its rank order."""
    return np.take_along_axis(T.T, ranking.order, axis=1)


def _ap(T, ranking, voc11=False):
    """AP (K,) in percent from targets T (N, K) and a Ranking; NaN for a class without positives."""
    t = _in_rank_order(T, ranking)
    # Hits at or above each rank, its whole tie group included; ignored (-1) labels in neither.
    tp = np.take_along_axis(np.cumsum(t == 1, axis=1), ranking.group_end, axis=1)
    fp = np.take_along_axis(np.cumsum(t == 0, axis=1), ranking.group_end, axis=1)
    n_pos = tp[:, -1]  # (K,)
    precision = tp / np.maximum(tp + fp, 1)  # (K, N); 0 above the first counted image
    if voc11:
        recall = tp / np.maximum(n_pos, 1)[:, None]
        # At each grid point r, the best precision at any rank with recall >= r (0 if none).
        best = [np.where(recall >= r, precision, 0.0).max(axis=1) for r in VOC11_GRID]
        ap = np.mean(best, axis=0)
    else:
        ap = (precision * (t == 1)).sum(axis=1) / np.maximum(n_pos, 1)  # mean over positives
    return np.where(n_pos > 0, 100 * ap, np.nan)


def average_precision(scores, targets, voc11=False):
    """AP per class (K,) in percent, NaN for a class without positives; voc11: see module doc."""
    S = _scores(scores)
    T = _targets(targets, S.shape, "scores")
    return _ap(T, _rank(S), voc11)


def auroc(scores, targets):
    """AUROC per class (K,) in percent: the share of a class's (positive, negative) pairs in which
    the positive scores higher, a tie counting half (Mann-Whitney U / (P N)). NaN for a class
    without positives or without negatives; -1 labels are left out."""
    S = _scores(scores)
    T = _targets(targets, S.shape, "scores")
    ranking = _rank(S)
    t = _in_rank_order(T, ranking)
    neg_at_or_above = np.cumsum(t == 0, axis=1)  # (K, N), at each rank
    neg_above = neg_at_or_above - (t == 0)
    # A positive beats the negatives below its tie group and ties with those inside it.
    above_group = np.take_along_axis(neg_above, ranking.group_start, axis=1)
    in_group = np.take_along_axis(neg_at_or_above, ranking.group_end, axis=1) - above_group
    n_neg = neg_at_or_above[:, -1]  # (K,)
    below_group = n_neg[:, None] - above_group - in_group
    wins = ((below_group + in_group / 2) * (t == 1)).sum(axis=1)
    pairs = (t == 1).sum(axis=1) * n_neg
    return np.where(pairs > 0, 100 * wins / np.maximum(pairs, 1), np.nan)


def _mean(a):  # over the non-NaN entries; NaN if there is none
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def _f1(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0  # 0 when nothing is right


def label_report(predicted, targets):
    """{CP, CR, CF1, OP, OR, OF1} in percent from predicted labels (N, K) (bool) and targets."""
    P = _as_array(predicted).astype(bool)
    T = _targets(targets, P.shape, "predicted")
    P = P & (T != -1)  # an ignored label is neither a true nor a false positive
    positive = T == 1
    correct = (P & positive).sum(axis=0)  # (K,)
    n_predicted = P.sum(axis=0)
    n_positive = positive.sum(axis=0)
    has = n_positive > 0
    CP = _mean(correct[has] / np.maximum(n_predicted[has], 1))  # never predicted: precision 0
    CR = _mean(correct[has] / n_positive[has])
    OP = correct.sum() / max(n_predicted.sum(), 1)
    OR = correct.sum() / n_positive.sum() if has.any() else float("nan")
    report = {"CP": CP, "CR": CR, "CF1": _f1(CP, CR), "OP": OP, "OR": OR, "OF1": _f1(OP, OR)}
    return {k: float(100 * v) for k, v in report.items()}


def multilabel_report(logits, targets, threshold=0.5, sizes=None):
    """{mAP, CP, CR, CF1, OP, OR, OF1} in percent, + AP_s, AP_m, AP_l when sizes (N, K) is given
    (1 small, 2 medium, 3 large, 0 absent or unknown), + "AP_per_class", a list of K floats (NaN:
    no positive). threshold: a probability, scalar or per class (K,)."""
    S = _scores(logits)
    T = _targets(targets, S.shape, "scores")
    ranking = _rank(S)
    ap = _ap(T, ranking)
    report = {"mAP": _mean(ap), **label_report(S >= logit(threshold), T)}
    if sizes is not None:
        Z = _sizes(sizes, T.shape)
        for c, key in SIZES.items():
            T_c = np.where((T == 1) & (Z != c), -1, T)  # present at another size: left out
            report[key] = _mean(_ap(T_c, ranking))
    report["AP_per_class"] = ap.tolist()
    return report


def _threshold_below(s, r):
    """(K,) probabilities that keep ranks 0..r[k] of each row of descending scores s (K, N): midway
    between the logits s[k, r] and s[k, r + 1]; 0 (keep all) when r is the last rank."""
    K, N = s.shape
    rows = np.arange(K)
    midway = (s[rows, r] + s[rows, np.minimum(r + 1, N - 1)]) / 2
    return np.where(r + 1 < N, _sigmoid(midway), 0.0)


def _best_overall(ranking, t, tp, n_predicted):
    """The probability threshold maximising CF1 when one threshold applies to every class."""
    n_pos = tp[:, -1]
    K_pos = np.sum(n_pos > 0)  # CP and CR average over the classes with positives
    # Lowering the threshold past one more label moves its class's precision and recall by one
    # step each (none in a class without positives); CP and CR at a threshold are the sums of the
    # steps above it over all classes, divided by K_pos.
    precision = tp / np.maximum(n_predicted, 1)
    step_P = np.diff(precision, axis=1, prepend=0).ravel()
    step_R = ((t == 1) / np.maximum(n_pos, 1)[:, None]).ravel()
    s = ranking.scores.ravel()
    order = np.argsort(-s)  # every label, by descending score
    s = s[order]
    CP = np.cumsum(step_P[order]) / K_pos
    CR = np.cumsum(step_R[order]) / K_pos
    CF1 = 2 * CP * CR / np.maximum(CP + CR, 1e-300)  # 0 while CP = CR = 0
    cuts = np.append(s[1:] != s[:-1], True)  # a threshold falls between distinct scores
    best = np.argmax(np.where(cuts, CF1, -1))  # the first, i.e. highest, of equal ones
    return float(_threshold_below(s[None], np.array([best]))[0])


def choose_thresholds(logits, targets):
    """The Thresholds, as probabilities, that maximise CF1 (overall) and each class's F1 (per_class)
    on these logits (N, K) and targets. Each lies midway between two consecutive distinct logits;
    0 means every label. Of equally good thresholds, the highest. (A float64 probability resolves
    a logit z to about 1e-16 e^z: 5e-8 at z = 20.)"""
    S = _scores(logits)
    T = _targets(targets, S.shape, "logits")
    ranking = _rank(S)
    t = _in_rank_order(T, ranking)
    # Counts when the threshold sits just below each rank (K, N); ignored labels are never counted.
    tp = np.cumsum(t == 1, axis=1)
    n_predicted = np.cumsum(t != -1, axis=1)
    n_pos = tp[:, -1]
    overall = _best_overall(ranking, t, tp, n_predicted)
    F1 = 2 * tp / np.maximum(n_predicted + n_pos[:, None], 1)  # F1 = 2 TP / (predicted + positive)
    at_cut = ranking.group_end == np.arange(S.shape[0])  # thresholds fall between tie groups
    best = np.argmax(np.where(at_cut, F1, -1), axis=1)  # (K,), the highest of equal ones
    per_class = np.where(n_pos > 0, _threshold_below(ranking.scores, best), overall)
    return Thresholds(overall, per_class)


def format_report(report):
    """The report's numbers on one line: 'mAP 86.80 | CP 84.00 CR 80.10 CF1 81.70 | OP 84.60 ...'.
    Keys outside the standard groups (e.g. a count accuracy) come last; lists are left out."""
    groups = [("mAP",), ("CP", "CR", "CF1"), ("OP", "OR", "OF1"), ("AP_s", "AP_m", "AP_l")]
    known = {k for g in groups for k in g}
    others = [k for k, v in report.items() if k not in known and isinstance(v, (int, float))]
    groups.append(others)
    parts = [" ".join(f"{k} {report[k]:.2f}" for k in g if k in report) for g in groups]
    return " | ".join(p for p in parts if p)
