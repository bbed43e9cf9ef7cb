"""Multi-label metrics of the paper's Tables 2-4 and 7, in percent, numpy only.

Inputs are (N, K) arrays or torch tensors: scores (any monotone score: logits or probabilities)
and targets with 1 = present, 0 = absent, -1 = ignore (an ignored entry is left out of that
class's ranking and of every count).

AP definitions in use are not comparable with one another, so the mode is named:
- "nonint" (default): non-interpolated AP, the mean over the positives of the precision at the
  rank of each positive. This is what the ML-GCN and ASL (TResNet) code behind Tables 2-4 compute.
- "voc11": VOC2007 devkit's 11-point interpolated AP, mean over t in {0, .1, ..., 1} of the
  maximum precision at recall >= t (0 if none); "recall >= t" is tested exactly, in integers.
- "vocall": VOC2010+ all-point interpolated AP (area under the monotone precision envelope), the
  one SSGRL and Query2Label report.
Table 3's rows mostly come from code computing "nonint" (ML-GCN 94.0, TResNet-L/ASL 94.6; SSGRL
93.4 uses "vocall"); "voc11" is the official VOC2007 number that older papers quote. Compare with
Table 3 in "nonint".

Conventions (chosen here, documented because they move numbers):
- Ties: tied scores form one group and every positive in a group gets the precision at the END of
  the group (as if the threshold sat between groups; scikit-learn's average_precision_score does the
  same). The result is independent of the input order. Without ties it equals the rank-by-rank
  definition above. Probabilities that saturate to exactly 1.0 in float32 tie; pass logits to
  avoid that (AP is invariant to any strictly increasing transform).
- A class with no positive has AP = NaN and is left out of the mean (ASL's code counts it as 0).
- CP/CR: per-class means over the classes with at least one positive (those in the mAP); a class
  with no predicted positive has precision 0 (ML-GCN's code: 0/0 -> 0). CF1 = 2 CP CR / (CP + CR)
  of those means (ML-GCN, C-Tran), not the mean of per-class F1s (ASL). OP/OR/OF1 pool every
  non-ignored decision of every class. A label is predicted when score >= threshold (ML-GCN).
"""

import numpy as np

MODES = ("nonint", "voc11", "vocall")
SIZE_KEYS = {1: "AP_s", 2: "AP_m", 3: "AP_l"}


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x.long()  # bf16 has no numpy dtype
    return np.asarray(x)


def _check(scores, targets, sizes=None):
    """Validated (scores (N, K) float, targets (N, K) int8, sizes (N, K) int8 or None)."""
    S, T = _to_numpy(scores), _to_numpy(targets)
    if S.ndim == 1:
        S = S[:, None]  # (N,) -> (N, 1): a single class
    if T.ndim == 1:
        T = T[:, None]
    if S.ndim != 2 or S.shape != T.shape:
        raise ValueError(f"scores {S.shape} and targets {T.shape} must both be (N, K)")
    if S.shape[0] == 0:
        raise ValueError("scores are empty (N = 0)")
    if S.dtype not in (np.float32, np.float64):
        S = S.astype(np.float64)
    if not np.isfinite(S).all():
        bad = np.argwhere(~np.isfinite(S))[0]
        raise ValueError(f"scores contain NaN or inf (first at sample {bad[0]}, class {bad[1]})")
    if not ((T == 1) | (T == 0) | (T == -1)).all():
        raise ValueError("targets must be 1 (present), 0 (absent) or -1 (ignore); got other values")
    T = T.astype(np.int8)
    if sizes is None:
        return S, T, None
    Z = _to_numpy(sizes)
    if Z.ndim == 1:
        Z = Z[:, None]
    if Z.shape != T.shape:
        raise ValueError(f"sizes {Z.shape} must have the targets' shape {T.shape}")
    if not ((Z == 0) | (Z == 1) | (Z == 2) | (Z == 3)).all():
        raise ValueError("sizes must be 0 (absent/unknown), 1 (small), 2 (medium) or 3 (large)")
    if (Z[T == 0] != 0).any():
        raise ValueError("sizes must be 0 where the target is 0 (absent label)")
    return S, T, Z.astype(np.int8)


def _rank(S):
    """Sort every class at once: order (K, N), descending scores, and for every rank the index of
    the last rank of its tie group (K, N)."""
    St = np.ascontiguousarray(S.T)  # (N, K) -> (K, N): one row per class
    order = np.argsort(-St, axis=1)  # any order inside a tie: ties are grouped just below
    s = np.take_along_axis(St, order, axis=1)  # (K, N) sorted descending
    N = s.shape[1]
    end = np.ones(s.shape, dtype=bool)
    end[:, :-1] = s[:, 1:] != s[:, :-1]  # rank i closes a tie group
    group_end = np.where(end, np.arange(N), N)  # (K, N)
    group_end = np.minimum.accumulate(group_end[:, ::-1], axis=1)[:, ::-1]  # next group end at or after i
    return order, group_end


def _ap_ranked(T, order, group_end, mode):
    """AP (K,) in percent from validated targets (N, K) and a ranking from _rank."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    t = np.take_along_axis(np.ascontiguousarray(T.T), order, axis=1)  # (N, K) -> (K, N) in rank order
    pos = t == 1
    tp = np.take_along_axis(np.cumsum(pos, axis=1, dtype=np.int32), group_end, axis=1)  # TP at each rank's group end
    fp = np.take_along_axis(np.cumsum(t == 0, axis=1, dtype=np.int32), group_end, axis=1)  # FP likewise
    n_pos = tp[:, -1].astype(np.float64)  # (K,)
    prec = tp / np.maximum(tp + fp, 1)  # (K, N); 0 before the first non-ignored entry
    with np.errstate(invalid="ignore", divide="ignore"):
        if mode == "nonint":
            ap = (prec * pos).sum(axis=1) / n_pos
        else:
            env = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # max precision at this rank or later
            if mode == "vocall":
                ap = (env * pos).sum(axis=1) / n_pos  # sum over recall steps of (1/n_pos) * envelope
            else:  # voc11: first rank with recall >= j/10, i.e. 10 tp >= j n_pos, exactly
                N = t.shape[1]
                ap = np.zeros(len(n_pos))
                for j in range(11):
                    first = (10 * tp < j * tp[:, -1:]).sum(axis=1)  # (K,), tp is non-decreasing
                    ap += np.where(first < N, env[np.arange(len(first)), np.minimum(first, N - 1)], 0.0) / 11
    return 100.0 * np.where(n_pos > 0, ap, np.nan)


def average_precision(scores, targets, mode="nonint"):
    """AP per class (K,) in percent; NaN for a class without positives. mode: see module doc."""
    S, T, _ = _check(scores, targets)
    return _ap_ranked(T, *_rank(S), mode)


def _nanmean(a):
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def _size_ap(T, Z, ranking):
    """Table 7. For size c and class k: positives are images whose label k has size c; negatives
    are images where k is absent; images where k is present at another (or unknown) size are left
    out of that ranking. AP_c is the mean over the classes with at least one positive of size c.
    Sizes follow COCO's areas, the label taking its largest instance's size (data.py)."""
    out = {}
    for c, key in SIZE_KEYS.items():
        T_c = np.where(T == 1, np.where(Z == c, 1, -1), T).astype(np.int8)  # other sizes -> ignore
        out[key] = _nanmean(_ap_ranked(T_c, *ranking, "nonint"))
    return out


def size_average_precision(scores, targets, sizes):
    """{"AP_s", "AP_m", "AP_l"} in percent (non-interpolated), as in Table 7; see _size_ap."""
    S, T, Z = _check(scores, targets, sizes)
    return _size_ap(T, Z, _rank(S))


def _f1(p, r):
    if np.isnan(p) or np.isnan(r):
        return float("nan")
    return 2 * p * r / (p + r) if p + r > 0 else 0.0  # 0 when nothing is right


def multilabel_report(scores, targets, threshold=0.5, sizes=None, top_k=None):
    """mAP, CP, CR, CF1, OP, OR, OF1 in percent (+ AP_s, AP_m, AP_l when sizes is given).

    threshold applies to the scores as given (0.5 for probabilities, 0.0 for logits).
    top_k (e.g. 3): an image's predicted labels are its top_k scores among its non-ignored classes
    that also reach the threshold (ML-GCN's top-3; threshold=-inf gives a pure top-k). Ties in
    top-k go to the lower class index.
    """
    S, T, Z = _check(scores, targets, sizes)
    ranking = _rank(S)
    valid, pos = T != -1, T == 1
    pred = (S >= threshold) & valid
    if top_k is not None:
        top = np.argsort(-np.where(valid, S, -np.inf), axis=1, kind="stable")[:, :top_k]  # (N, top_k)
        in_top = np.zeros_like(pred)
        np.put_along_axis(in_top, top, True, axis=1)
        pred &= in_top
    Nc = (pred & pos).sum(axis=0)  # (K,) true positives
    Np = pred.sum(axis=0)  # (K,) predicted positives
    Ng = pos.sum(axis=0)  # (K,) ground-truth positives
    has = Ng > 0
    CP = _nanmean(np.where(Np > 0, Nc / np.maximum(Np, 1), 0.0)[has])
    CR = _nanmean((Nc / np.maximum(Ng, 1))[has])
    OP = Nc.sum() / Np.sum() if Np.sum() > 0 else 0.0
    OR = Nc.sum() / Ng.sum() if Ng.sum() > 0 else float("nan")
    report = {"mAP": _nanmean(_ap_ranked(T, *ranking, "nonint")),
              "CP": 100 * CP, "CR": 100 * CR, "CF1": 100 * _f1(CP, CR),
              "OP": 100 * OP, "OR": 100 * OR, "OF1": 100 * _f1(OP, OR)}
    if Z is not None:
        report.update(_size_ap(T, Z, ranking))
    return {k: float(v) for k, v in report.items()}


def format_report(report):
    """One line for logs, e.g. 'mAP 86.80 | CP 84.00 CR 80.10 CF1 81.70 | OP 84.60 ...'."""
    groups = [("mAP",), ("CP", "CR", "CF1"), ("OP", "OR", "OF1"), ("AP_s", "AP_m", "AP_l")]
    known = {k for g in groups for k in g}
    groups.append(tuple(k for k in report if k not in known))
    parts = [" ".join(f"{k} {report[k]:.2f}" for k in g if k in report) for g in groups]
    return " | ".join(p for p in parts if p)
