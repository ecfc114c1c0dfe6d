"""Metrics: pure numpy functions over a whole split's predictions (never averages of batch values).

``compute_metrics`` gathers them into one JSON-serialisable dict. Each metric is also a small public
function, checked in the tests against scikit-learn (which is only a test dependency here).

Conventions, matching scikit-learn's defaults where it has one:

- predicted label = ``argmax`` of the probabilities (first class on a tie);
- macro F1 averages over the classes present in ``y_true`` or in the predictions; balanced accuracy
  averages the recall of the classes present in ``y_true``; an undefined precision/recall/F1 is 0;
- ROC AUC is one-vs-rest, macro-averaged over the classes that have both positives and negatives in
  ``y_true`` (``None`` when there is none);
- two classes: the second (index 1) is the positive one (IDC in the breast histopathology set);
  ``f1_positive`` is its F1, ``pr_auc`` the area under its precision-recall curve as average
  precision (scikit-learn's step sum, no interpolation), ``auc`` its ROC AUC;
- ECE uses 15 equal-width confidence bins, each (lo, hi];
- a group's label is the majority label of its images (lowest class index on a tie); its prediction
  is the majority of its images' predicted labels, a tie broken by the summed probabilities;
- confidence intervals are 95 % percentile bootstraps; with groups, whole groups are resampled.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

EPS = 1e-12


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of predictions equal to the true label."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def _n_classes(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None) -> int:
    return int(max(np.max(y_true), np.max(y_pred)) + 1) if n_classes is None else n_classes


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Unweighted mean F1 over the classes present in y_true or y_pred."""
    cm = confusion_matrix(y_true, y_pred, _n_classes(y_true, y_pred, n_classes))
    present = (cm.sum(0) + cm.sum(1)) > 0
    return float(per_class_scores(cm)[2][present].mean())


def balanced_accuracy(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None
) -> float:
    """Mean recall over the classes present in y_true."""
    cm = confusion_matrix(y_true, y_pred, _n_classes(y_true, y_pred, n_classes))
    _, recall, _, support = per_class_scores(cm)
    return float(recall[support > 0].mean())


def log_loss(y_true: np.ndarray, probs: np.ndarray, eps: float = EPS) -> float:
    """Mean negative log-likelihood of the true class, probabilities clipped at eps."""
    p = np.asarray(probs)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.clip(p, eps, 1.0))))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_run = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(new_run) - 1]
    return ranks


def binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic (ties count one half)."""
    pos = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = _average_ranks(np.asarray(scores, dtype=float))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC AUC over classes with positives and negatives in y_true, else None."""
    y_true = np.asarray(y_true)
    aucs = [
        binary_auc(y_true == c, probs[:, c])
        for c in range(probs.shape[1])
        if 0 < np.sum(y_true == c) < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else None


def f1_positive(y_true: np.ndarray, y_pred: np.ndarray, positive: int = 1) -> float:
    """F1 of one class, by default the second (the positive class of binary data); 0 where undefined."""
    n = max(_n_classes(y_true, y_pred, None), positive + 1)
    return float(per_class_scores(confusion_matrix(y_true, y_pred, n))[2][positive])


def average_precision(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """PR AUC as average precision: the sum over score thresholds, highest first, of (recall gained)
    x precision there; None without positives."""
    pos = np.asarray(is_positive, dtype=bool)
    if not pos.any():
        return None
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], pos[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # a threshold's last row: ties go together
    tp = np.cumsum(p)[last]
    precision, recall = tp / (last + 1), tp / pos.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Support-weighted mean |accuracy - confidence| over equal-width confidence bins (lo, hi]."""
    probs = np.asarray(probs)
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def group_votes(
    y_true: np.ndarray, probs: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (sorted ids): majority true label, majority-vote prediction, and the group ids."""
    probs = np.asarray(probs)
    n_classes = probs.shape[1]
    ids, inv = np.unique(np.asarray(groups), return_inverse=True)
    inv = inv.ravel()
    labels = np.zeros((len(ids), n_classes))
    np.add.at(labels, (inv, np.asarray(y_true)), 1)
    votes = np.zeros((len(ids), n_classes))
    np.add.at(votes, (inv, probs.argmax(1)), 1)
    summed = np.zeros((len(ids), n_classes))
    np.add.at(summed, inv, probs)
    tied = votes == votes.max(1, keepdims=True)
    preds = np.where(tied, summed, -np.inf).argmax(1)
    return labels.argmax(1), preds, ids


def group_accuracy(y_true: np.ndarray, probs: np.ndarray, groups: np.ndarray) -> float:
    """Fraction of groups whose majority-vote prediction equals the group's label."""
    labels, preds, _ = group_votes(y_true, probs, groups)
    return float(np.mean(labels == preds))


def wilson_ci(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a binomial proportion (sound at 0 % and 100 %)."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def bootstrap_ci(
    correct: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[float] | None:
    """Percentile bootstrap CI of a mean of 0/1 outcomes, resampling whole groups if given."""
    if n_boot <= 0:
        return None
    correct = np.asarray(correct, dtype=float)
    if groups is None:
        hits, sizes = correct, np.ones_like(correct)
    else:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        hits = np.bincount(inv.ravel(), weights=correct)
        sizes = np.bincount(inv.ravel()).astype(float)
    rng = np.random.default_rng(seed)
    n = len(hits)
    chunk = max(1, 2_000_000 // n)  # bound memory: at most ~2M resampled indices at once
    stats = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        stats.append(hits[idx].sum(1) / sizes[idx].sum(1))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.concatenate(stats), [tail, 100 - tail])
    return [float(lo), float(hi)]


def _validate(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    if probs.ndim != 2 or y_true.ndim != 1 or len(y_true) != len(probs) or len(y_true) == 0:
        raise ValueError(
            f"need y_true (N,) and probs (N, C), N > 0; got {y_true.shape}, {probs.shape}"
        )
    if probs.shape[1] != len(classes):
        raise ValueError(f"probs has {probs.shape[1]} columns but there are {len(classes)} classes")
    if y_true.min() < 0 or y_true.max() >= len(classes):
        raise ValueError(
            f"labels must lie in [0, {len(classes)}), got {y_true.min()}..{y_true.max()}"
        )
    if not np.allclose(probs.sum(1), 1.0, atol=1e-3):
        raise ValueError("probs rows must sum to 1 (pass softmax probabilities, not logits)")


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    loss: float | None = None,
) -> dict:
    """All metrics of one split as plain JSON-serialisable values (see the module docstring)."""
    y_true = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _validate(y_true, probs, classes)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != y_true.shape:
            raise ValueError(f"groups must have shape {y_true.shape}, got {groups.shape}")
    n_classes = len(classes)
    y_pred = probs.argmax(1)
    correct = y_pred == y_true
    cm = confusion_matrix(y_true, y_pred, n_classes)
    precision, recall, f1, support = per_class_scores(cm)
    out = {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "loss": float(loss) if loss is not None else log_loss(y_true, probs),
        "macro_f1": macro_f1(y_true, y_pred, n_classes),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, n_classes),
        "auc": roc_auc_ovr(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion": cm.tolist(),
        "accuracy_ci": bootstrap_ci(correct, groups, n_boot, seed),
    }
    if n_classes == 2:  # the binary headline figures (the second class is the positive one)
        # no positive image and none predicted: its F1 is not measured (None), not 0 beside a macro-F1
        # of 1 over the one class the split holds
        absent = support[1] == 0 and cm[:, 1].sum() == 0
        out.update(positive_class=classes[1], f1_positive=None if absent else float(f1[1]),
                   pr_auc=average_precision(y_true == 1, probs[:, 1]))
    if groups is not None:
        labels, preds, ids = group_votes(y_true, probs, groups)
        out["group_accuracy"] = float(np.mean(labels == preds))
        out["n_groups"] = int(len(ids))
        # Wilson, not a bootstrap: with every group right (or wrong) a bootstrap gives [1, 1], which
        # claims a certainty that 71 cells cannot give.
        out["group_accuracy_ci"] = wilson_ci(int(np.sum(labels == preds)), len(ids)) if n_boot > 0 else None
    return out


def binary_line(m: dict) -> str:
    """The binary headline figures of a metrics dict as console text ('' for more than two classes)."""
    if "f1_positive" not in m:
        return ""

    def f(x) -> str:
        return "-" if x is None else f"{x:.4f}"

    return (f"balanced accuracy {f(m.get('balanced_accuracy'))}  F1 ({m['positive_class']}) "
            f"{f(m['f1_positive'])}  ROC AUC {f(m.get('auc'))}  PR AUC {f(m.get('pr_auc'))}")


def split_metrics(classes: list[str], groups: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict:
    """compute_metrics for one split, with group-level figures where images share groups."""
    groups = groups if len(np.unique(groups)) < len(groups) else None
    m = compute_metrics(labels, probs, classes, groups=groups)
    if groups is None:  # every image its own source: group figures are the image figures
        m.setdefault("group_accuracy", m["accuracy"])
        m.setdefault("group_accuracy_ci", wilson_ci(int(round(m["accuracy"] * len(labels))), len(labels)))
        m.setdefault("n_groups", int(len(labels)))
    return m


def per_source_metrics(classes: list[str], groups: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                       sources: np.ndarray, names: list[str]) -> dict:
    """split_metrics of each source's images (``sources``: an index into ``names`` per image), by name."""
    out = {}
    for k, name in enumerate(names):
        rows = np.flatnonzero(sources == k)
        if len(rows):
            out[name] = split_metrics(classes, groups[rows], labels[rows], probs[rows])
    return out


# -- detection ------------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4, x0,y0,x1,y1) with every box in ``b`` (M x 4): N x M."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def centres_inside(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """N x M: 1 where box a[i]'s centre lies in b[j] and b[j]'s in a[i] (the same cell, whatever the
    extent each annotator drew), else 0."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    a_in_b = ((ca[:, None] >= b[None, :, :2]) & (ca[:, None] <= b[None, :, 2:])).all(2)
    b_in_a = ((cb[None, :] >= a[:, None, :2]) & (cb[None, :] <= a[:, None, 2:])).all(2)
    return (a_in_b & b_in_a).astype(np.float64)


def match_detections(pred_boxes: np.ndarray, scores: np.ndarray, true_boxes: np.ndarray,
                     iou: float = 0.5, criterion: str = "iou") -> np.ndarray:
    """Greedy matching as Pascal VOC does: detections in falling score order each take the unmatched
    true box they overlap most (IoU >= ``iou``; with ``criterion="centre"``, any true box whose centre
    and the detection's lie each in the other); returns one bool per detection (true positive)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.zeros(len(order), bool)
    if len(true_boxes) == 0 or len(order) == 0:
        return tp
    if criterion == "centre":
        ious, iou = centres_inside(pred_boxes, true_boxes) * (0.5 + 0.5 * box_iou(pred_boxes, true_boxes)), 0.5
    else:
        ious = box_iou(pred_boxes, true_boxes)
    taken = np.zeros(len(true_boxes), bool)
    for i in order:
        cand = np.where(~taken, ious[i], -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou:
            taken[j] = True
            tp[i] = True
    return tp


def detection_scores(fields: list[tuple[np.ndarray, np.ndarray, np.ndarray]], threshold: float,
                     iou: float = 0.5, criterion: str = "iou") -> dict:
    """One class over many fields, each (detected boxes, their scores, true boxes): AP at ``iou``
    (all-point interpolated, as Pascal VOC 2010+ and COCO's per-IoU AP), and precision, recall and
    F1 of the detections scoring at least ``threshold``; ``criterion`` as match_detections."""
    all_scores, all_tp, n_true = [], [], 0
    for boxes, scores, truth in fields:
        all_scores.append(np.asarray(scores, np.float64))
        all_tp.append(match_detections(boxes, scores, truth, iou, criterion))
        n_true += len(truth)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
    order = np.argsort(-scores, kind="stable")
    tp_sorted = tp[order]
    ctp, cfp = np.cumsum(tp_sorted), np.cumsum(~tp_sorted)
    recall = ctp / max(n_true, 1)
    precision = ctp / np.maximum(ctp + cfp, 1)
    # all-point interpolation: precision made non-increasing, summed over the recall steps
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [recall[-1] if len(recall) else 0.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    ap = float(np.sum((mrec[1:] - mrec[:-1]) * mprec[1:])) if n_true else None
    kept = scores >= threshold
    n_tp, n_det = int(tp[kept].sum()), int(kept.sum())
    p = n_tp / n_det if n_det else (1.0 if n_true == 0 else 0.0)
    r = n_tp / n_true if n_true else None
    f1 = 2 * p * r / (p + r) if r is not None and p + r > 0 else (0.0 if r is not None else None)
    return {"ap50" if iou == 0.5 or criterion == "centre" else f"ap{round(iou * 100)}": ap, "precision": p, "recall": r, "f1": f1,
            "true": n_true, "detected": n_det, "matched": n_tp, "threshold": threshold}


THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # the scores best_threshold tries


def best_threshold(fields: list[tuple[np.ndarray, np.ndarray, np.ndarray]], iou: float = 0.5,
                   grid=THRESHOLDS) -> float:
    """The score threshold with the highest F1 on these fields (ties: the lower threshold, which
    keeps more cells)."""
    best, best_f1 = float(grid[0]), -1.0
    for t in grid:
        f1 = detection_scores(fields, float(t), iou)["f1"] or 0.0
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(t), f1
    return best


def cells_needed(p: float, half_width: float, level: float = 0.95, most: int = 100_000) -> int:
    """How many cells a count needs so that a class making up ``p`` of them has a Wilson interval no
    wider than +- ``half_width`` (at p = 0.5, the worst case, 381 cells give +- 5 points)."""
    def half(n: int) -> float:
        lo, hi = wilson_ci(round(p * n), n, level)
        return (hi - lo) / 2

    lo, hi = 1, most
    while lo < hi:  # the half-width shrinks as n grows: the first n that is narrow enough
        mid = (lo + hi) // 2
        if half(mid) <= half_width:
            hi = mid
        else:
            lo = mid + 1
    return lo


def differential(labels: list[str], classes: list[str], level: float = 0.95) -> dict:
    """A white-cell differential: per class the count, the percentage and its Wilson interval (what
    haematologists read from Rümke's table), and how many cells a +-5 and +-10 point count needs at
    the largest class's share."""
    n = len(labels)
    rows = []
    for c in classes:
        k = sum(1 for lab in labels if lab == c)
        ci = wilson_ci(k, n, level)
        rows.append({"class": c, "count": k, "percent": round(100 * k / n, 1) if n else None,
                     "ci95": [round(100 * v, 1) for v in ci] if ci else None})
    top = max((r["count"] for r in rows), default=0) / n if n else 0.5
    need = {"5": cells_needed(top, 0.05, level), "10": cells_needed(top, 0.10, level)}
    note = (f"{n} cells: the largest class ({100 * top:.0f} %) is known to within the interval shown; "
            f"+-10 points needs {need['10']} cells, +-5 points {need['5']}") if n else "no white cell found"
    return {"cells": n, "classes": rows, "cells_needed": need, "note": note}
