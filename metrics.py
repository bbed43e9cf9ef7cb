"""Multi-label metrics of Section 4.1 (Tables 2-4) and Table 7, in percent, numpy only.

Inputs are (N, K) numpy arrays or torch tensors: scores (any monotone score: logits or
probabilities) and targets with 1 = present, 0 = absent, -1 = ignore (VOC's difficult).

AP, per class, is scikit-learn's average_precision_score: rank the images by descending score;
AP = the mean, over the positives, of the precision TP / (TP + FP) at each positive's rank, where
images with tied scores form one group and every positive of a group gets the precision at the END
of its group (as if the threshold sat between groups). mAP is the mean over classes.
Paper: "mAP [12]", the definition unstated. Here: the above, because without ties it is the
non-interpolated AP that the code of ML-GCN [12] and ASL computes (Tables 2-4), and grouping ties
makes it independent of the input order. (Probabilities saturating to exactly 1.0 in float32 tie:
pass logits, AP is invariant to increasing transforms.) voc11=True gives the VOC2007 devkit's
11-point AP, the official VOC2007 number older rows of Table 3 quote: the mean over t in MATLAB's
0:0.1:1 of the maximum precision at recall >= t (0 if none). MATLAB builds that grid in floating
point, so its 4th point is 3 * 0.1 = 0.30000000000000004 and a rank with recall exactly 0.3 does
not reach it; VOC11_GRID reproduces the grid, so the numbers are the devkit's (ties aside: its
stable sort orders them by input). Other definitions (VOC2010+ all-point envelope, SSGRL and
Query2Label) are not computed: APs under different definitions are not comparable.

Conventions (the paper states none; they move numbers, so here they are for cross-checking):
- An ignored (-1) label is left out of everything: of its class's AP ranking, as ML-GCN evaluates
  mAP, and of CP, CR, OP, OR (neither a true nor a false positive), one meaning of -1 throughout.
  ML-GCN's CP/CR/CF1/OP/OR/OF1 instead count a difficult label as a negative (predicting it is a
  false positive), so on VOC our precisions are >= theirs. COCO and NUS-WIDE have no -1.
- A class with no positive has AP = NaN and is left out of the mean (ASL's code counts it as 0),
  and out of CP/CR (ML-GCN divides by all K classes: the same when every class has a positive).
- A label is predicted when score >= threshold (0.5 on probabilities; ML-GCN: logit >= 0). CP/CR
  are means over classes of per-class precision/recall; a class never predicted has precision 0.
  CF1 = 2 CP CR / (CP + CR) (ML-GCN, C-Tran), not the mean of per-class F1s (ASL). OP/OR/OF1
  pool the counts of all classes. ML-GCN sets Np[Np == 0] = 1 before pooling: one phantom
  prediction per never-predicted class in OP's denominator (its CP is unaffected, 0/1 = 0); we
  pool the true counts, so our OP is above ML-GCN's whenever a class is never predicted.
- AP_s/AP_m/AP_l (Table 7): label sizes 1 small, 2 medium, 3 large (COCO's areas; data.py gives a
  label its largest instance's size), 0 absent or unknown. For size c and class k the positives
  are the images with k at size c, the negatives those without k; images with k at another size
  are left out of that ranking. AP_c is the mean over the classes with such positives.
"""

import numpy as np

# MATLAB's 0:0.1:1: the first half a + k d, the second half b - (n - k) d (its colon operator).
VOC11_GRID = np.array([k * 0.1 for k in range(6)] + [1 - k * 0.1 for k in range(4, -1, -1)])
SIZES = {1: "AP_s", 2: "AP_m", 3: "AP_l"}


def _as_array(x):
    if hasattr(x, "detach"):  # a torch tensor (torch is not imported here); bf16 has no numpy dtype
        x = x.detach().cpu().double() if x.is_floating_point() else x.detach().cpu().long()
    return np.asarray(x)


def _check(scores, targets, sizes=None):
    """(scores (N, K) float, targets (N, K), sizes (N, K) or None) as numpy; ValueError if invalid."""
    S, T = _as_array(scores), _as_array(targets)
    S = S.astype(np.result_type(S.dtype, np.float32), copy=False)  # ints -> float64, float32 stays
    if S.ndim != 2 or S.shape != T.shape:
        raise ValueError(f"scores {S.shape} and targets {T.shape} must both be (N, K)")
    if not np.isfinite(S).all():
        i, k = np.argwhere(~np.isfinite(S))[0]
        raise ValueError(f"scores contain NaN or inf (first at sample {i}, class {k})")
    if not np.isin(T, (1, 0, -1)).all():
        raise ValueError("targets must be 1 (present), 0 (absent) or -1 (ignore); got other values")
    Z = None if sizes is None else _as_array(sizes)
    if Z is not None and (Z.shape != T.shape or not np.isin(Z, (0, 1, 2, 3)).all()):
        raise ValueError(
            f"sizes must have the targets' shape {T.shape} and values 0 (absent), "
            "1 (small), 2 (medium) or 3 (large)"
        )
    return S, T, Z


def _rank(S):
    """Every class ranked at once by descending score: order (K, N), image index at each rank, and
    group_end (K, N), the last rank of each rank's tie group."""
    St = np.ascontiguousarray(S.T)  # (N, K) -> (K, N): one row per class
    order = np.argsort(-St, axis=1)  # any order inside a tie: ties are grouped below
    s = np.take_along_axis(St, order, axis=1)  # (K, N), descending
    K, N = s.shape
    closes = np.concatenate(
        [s[:, 1:] != s[:, :-1], np.ones((K, 1), bool)], axis=1
    )  # rank ends a group
    group_end = np.where(closes, np.arange(N), N)  # (K, N)
    group_end = np.minimum.accumulate(group_end[:, ::-1], axis=1)[
        :, ::-1
    ]  # first group end at or after
    return order, group_end


def _ap(T, ranking, voc11=False):
    """AP (K,) in percent from targets T (N, K) and a ranking from _rank; NaN without positives."""
    order, group_end = ranking
    t = np.take_along_axis(
        np.ascontiguousarray(T.T), order, axis=1
    )  # (N, K) -> (K, N) in rank order

    def count_to_group_end(hit):  # (K, N): hits at or above each rank, its whole tie group included
        return np.take_along_axis(np.cumsum(hit, axis=1, dtype=np.int32), group_end, axis=1)

    tp, fp = count_to_group_end(t == 1), count_to_group_end(t == 0)  # ignored (-1): neither
    n_pos = tp[:, -1]  # (K,)
    precision = tp / np.maximum(tp + fp, 1)  # (K, N); 0 above the first counted image
    if voc11:
        recall = tp / np.maximum(n_pos, 1)[:, None]  # (K, N), in float64 like the devkit's
        ap = sum(np.where(recall >= r, precision, 0.0).max(axis=1) for r in VOC11_GRID) / 11
    else:
        ap = (precision * (t == 1)).sum(axis=1) / np.maximum(
            n_pos, 1
        )  # mean precision at positives
    return np.where(n_pos > 0, 100 * ap, np.nan)


def average_precision(scores, targets, voc11=False):
    """AP per class (K,) in percent, NaN for a class without positives; voc11: see module doc."""
    S, T, _ = _check(scores, targets)
    return _ap(T, _rank(S), voc11)


def _mean(a):  # over the non-NaN entries; NaN if there is none
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def _f1(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0  # 0 when nothing is right


def multilabel_report(scores, targets, threshold=0.5, sizes=None):
    """{mAP, CP, CR, CF1, OP, OR, OF1} in percent, + AP_s, AP_m, AP_l when sizes (N, K) is given,
    + "AP_per_class", a list of K floats (NaN: no positive). threshold applies to the scores as
    given (0.5 for probabilities, 0.0 for logits). Conventions: module doc."""
    S, T, Z = _check(scores, targets, sizes)
    ranking = _rank(S)
    ap = _ap(T, ranking)
    pred, pos = (S >= threshold) & (T != -1), T == 1
    Nc, Np, Ng = (
        (pred & pos).sum(0),
        pred.sum(0),
        pos.sum(0),
    )  # (K,) correct, predicted, ground truth
    has = Ng > 0
    CP = _mean(Nc[has] / np.maximum(Np[has], 1))  # never predicted: precision 0
    CR = _mean(Nc[has] / Ng[has])
    OP = Nc.sum() / max(Np.sum(), 1)
    OR = Nc.sum() / Ng.sum() if Ng.sum() else float("nan")
    report = {
        "mAP": _mean(ap),
        "CP": 100 * CP,
        "CR": 100 * CR,
        "CF1": 100 * _f1(CP, CR),
        "OP": 100 * OP,
        "OR": 100 * OR,
        "OF1": 100 * _f1(OP, OR),
    }
    if Z is not None:
        for c, key in SIZES.items():
            T_c = np.where(
                pos & (Z != c), -1, T
            )  # present at another size: left out of the ranking
            report[key] = _mean(_ap(T_c, ranking))
    report = {k: float(v) for k, v in report.items()}
    report["AP_per_class"] = ap.tolist()
    return report


def format_report(report):
    """The report's numbers on one line: 'mAP 86.80 | CP 84.00 CR 80.10 CF1 81.70 | OP 84.60 ...'.
    Keys outside the standard groups (e.g. a count accuracy) come last; lists are left out."""
    groups = [("mAP",), ("CP", "CR", "CF1"), ("OP", "OR", "OF1"), ("AP_s", "AP_m", "AP_l")]
    known = {k for g in groups for k in g}
    groups.append(
        tuple(k for k, v in report.items() if k not in known and isinstance(v, (int, float)))
    )
    parts = [" ".join(f"{k} {report[k]:.2f}" for k in g if k in report) for g in groups]
    return " | ".join(p for p in parts if p)
