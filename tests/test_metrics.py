"""Metrics against scikit-learn on random data, and hand-built cases for what it lacks."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from bloodcell.metrics import (
    accuracy,
    average_precision,
    balanced_accuracy,
    binary_auc,
    binary_line,
    bootstrap_ci,
    compute_metrics,
    confusion_matrix,
    expected_calibration_error,
    f1_positive,
    group_accuracy,
    log_loss,
    macro_f1,
    roc_auc_ovr,
)

SEEDS = [0, 1, 2, 3]
C = 4
CLASSES = ["a", "b", "c", "d"]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def random_case(seed: int, n: int = 200, kind: str = "plain") -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities loosely correlated with them; 'ties' reuses 6 rows; 'missing' never predicts class 3."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    logits = rng.normal(size=(n, C)) + 1.5 * np.eye(C)[y]
    if kind == "ties":
        protos = softmax(rng.normal(size=(6, C)))
        probs = protos[rng.integers(0, 6, n)]
        return y, probs
    if kind == "missing":
        logits[:, 3] -= 20.0  # never predicted, yet above the 1e-12 clip
    return y, softmax(logits)


CASES = [(seed, kind) for seed in SEEDS for kind in ("plain", "ties", "missing")]


@pytest.mark.parametrize("seed,kind", CASES)
def test_label_metrics_match_sklearn(seed: int, kind: str) -> None:
    y, probs = random_case(seed, kind=kind)
    pred = probs.argmax(1)
    if kind == "missing":
        assert 3 not in pred and 3 in y
    assert accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert macro_f1(y, pred, C) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert balanced_accuracy(y, pred, C) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    np.testing.assert_array_equal(
        confusion_matrix(y, pred, C), skm.confusion_matrix(y, pred, labels=range(C))
    )
    assert log_loss(y, probs) == pytest.approx(skm.log_loss(y, probs, labels=range(C)), rel=1e-6)

    m = compute_metrics(y, probs, CLASSES, n_boot=50)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(C), zero_division=0)
    for i, name in enumerate(CLASSES):
        got = m["per_class"][name]
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx([p[i], r[i], f[i]])
        assert got["support"] == s[i]


@pytest.mark.parametrize("seed,kind", CASES)
def test_auc_matches_sklearn(seed: int, kind: str) -> None:
    y, probs = random_case(seed, kind=kind)
    expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=range(C))
    assert roc_auc_ovr(y, probs) == pytest.approx(expected)


def test_binary_auc_with_ties_by_hand() -> None:
    # Positives 0.5, 0.9; negatives 0.5, 0.1: pairs (0.5 vs 0.5) = 1/2, the other three = 1.
    assert binary_auc(np.array([1, 1, 0, 0]), np.array([0.5, 0.9, 0.5, 0.1])) == 0.875


def test_auc_skips_classes_absent_from_y_true() -> None:
    y, probs = random_case(0)
    keep = y != 2
    y, probs = y[keep], probs[keep]
    per_class = [skm.roc_auc_score(y == c, probs[:, c]) for c in (0, 1, 3)]
    assert roc_auc_ovr(y, probs) == pytest.approx(np.mean(per_class))
    assert roc_auc_ovr(np.zeros(5, int), np.full((5, C), 0.25)) is None


def test_ece_by_hand() -> None:
    # Two images at confidence 0.9 (one right) and two at 0.6 (both right), 15 bins:
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(y, probs) == pytest.approx(0.4)
    # Perfectly calibrated in one bin: 0.7 confidence, 7 of 10 right.
    probs = np.tile([0.7, 0.3], (10, 1))
    y = np.array([0] * 7 + [1] * 3)
    assert expected_calibration_error(y, probs) == pytest.approx(0.0)


def test_group_accuracy_by_hand() -> None:
    probs = np.array(
        [
            [0.9, 0.1, 0.0],  # group 10, labels 0 0 0, votes 0 0 1 -> 0: right
            [0.6, 0.4, 0.0],
            [0.2, 0.8, 0.0],
            [0.7, 0.3, 0.0],  # group 20, labels 1 1, votes 0 1 tie, sums 0.9 < 1.1 -> 1: right
            [0.2, 0.8, 0.0],
            [0.55, 0.45, 0.0],  # group 30, labels 1 1 2 -> 1, votes 0 2 2 -> 2: wrong
            [0.0, 0.0, 1.0],
            [0.0, 0.0, 1.0],
        ]
    )
    y = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    groups = np.array([10, 10, 10, 20, 20, 30, 30, 30])
    assert group_accuracy(y, probs, groups) == pytest.approx(2 / 3)
    m = compute_metrics(y, probs, ["x", "y", "z"], groups=groups, n_boot=10)
    assert m["n_groups"] == 3 and m["group_accuracy"] == pytest.approx(2 / 3)
    # A pure vote tie broken by the summed probabilities:
    probs = np.array([[0.9, 0.1], [0.4, 0.6]])
    assert group_accuracy(np.array([0, 0]), probs, np.array([1, 1])) == 1.0
    assert group_accuracy(np.array([1, 1]), probs, np.array([1, 1])) == 0.0


def test_compute_metrics_keys_and_json() -> None:
    y, probs = random_case(5)
    groups = np.arange(len(y)) // 4
    m = compute_metrics(y, probs, CLASSES, groups=groups, n_boot=100)
    expected = {
        "n",
        "accuracy",
        "loss",
        "macro_f1",
        "balanced_accuracy",
        "auc",
        "ece",
        "per_class",
        "confusion",
        "accuracy_ci",
        "group_accuracy",
        "n_groups",
        "group_accuracy_ci",
    }
    assert set(m) == expected
    assert m["n"] == len(y) and m["n_groups"] == 50
    assert sum(map(sum, m["confusion"])) == len(y)
    json.dumps(m)
    assert compute_metrics(y, probs, CLASSES, loss=0.5, n_boot=0)["loss"] == 0.5
    assert "group_accuracy" not in compute_metrics(y, probs, CLASSES, n_boot=10)


def test_compute_metrics_rejects_bad_input() -> None:
    y, probs = random_case(0)
    with pytest.raises(ValueError, match="columns"):
        compute_metrics(y, probs, CLASSES[:3])
    with pytest.raises(ValueError, match="sum to 1"):
        compute_metrics(y, np.log(probs), CLASSES)


def grouped_case(n_groups: int, n: int = 240, seed: int = 0) -> tuple:
    """Images in n_groups equal groups; a group's images are all right or all wrong."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), n // n_groups)
    y = rng.integers(0, C, n_groups)[groups]
    right = (rng.random(n_groups) < 0.7)[groups]
    pred = np.where(right, y, (y + 1) % C)
    probs = np.full((n, C), 0.1)
    probs[np.arange(n), pred] = 0.7
    return y, probs, groups


def test_ci_contains_estimate_and_widens_with_fewer_groups() -> None:
    widths = {}
    for n_groups in (8, 120):
        y, probs, groups = grouped_case(n_groups)
        m = compute_metrics(y, probs, CLASSES, groups=groups, n_boot=500)
        for key, ci in (("accuracy", "accuracy_ci"), ("group_accuracy", "group_accuracy_ci")):
            assert m[ci][0] <= m[key] <= m[ci][1]
        widths[n_groups] = (
            m["accuracy_ci"][1] - m["accuracy_ci"][0],
            m["group_accuracy_ci"][1] - m["group_accuracy_ci"][0],
        )
    assert widths[8][0] > widths[120][0] and widths[8][1] > widths[120][1]
    # Resampling images ignores the grouping and is too narrow here.
    y, probs, groups = grouped_case(8)
    image_ci = compute_metrics(y, probs, CLASSES, n_boot=500)["accuracy_ci"]
    assert image_ci[1] - image_ci[0] < widths[8][0]


def test_bootstrap_ci_is_seeded() -> None:
    correct = np.random.default_rng(0).random(100) < 0.6
    assert bootstrap_ci(correct, seed=1) == bootstrap_ci(correct, seed=1)
    assert bootstrap_ci(correct, n_boot=0) is None


def test_wilson_interval_is_honest_at_100_percent():
    from bloodcell.metrics import wilson_ci

    lo, hi = wilson_ci(71, 71)
    assert hi == 1.0 and 0.94 < lo < 0.96  # 71 cells all right still leave about 5 % doubt
    lo, hi = wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
    m = compute_metrics(y, probs, ["a", "b"], groups=np.array([0, 0, 1, 1]))
    assert m["group_accuracy"] == 1.0 and m["group_accuracy_ci"][0] < 0.5


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_binary_figures_match_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(int)  # imbalanced, as IDC is (28 % positive)
    p1 = np.clip(0.35 * y + rng.random(300) * 0.65, 0, 1)
    if ties:
        p1 = np.round(p1, 1)
    probs = np.stack([1 - p1, p1], 1)
    assert average_precision(y == 1, p1) == pytest.approx(skm.average_precision_score(y, p1), abs=1e-12)
    assert f1_positive(y, probs.argmax(1)) == pytest.approx(skm.f1_score(y, probs.argmax(1)), abs=1e-12)
    m = compute_metrics(y, probs, ["no IDC", "IDC"], n_boot=0)
    assert m["positive_class"] == "IDC" and m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p1))
    assert m["f1_positive"] == pytest.approx(skm.f1_score(y, probs.argmax(1)))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, probs.argmax(1)))
    line = binary_line(m)
    assert f"F1 (IDC) {m['f1_positive']:.4f}" in line and f"PR AUC {m['pr_auc']:.4f}" in line


def test_binary_figures_only_for_two_classes_and_edge_cases() -> None:
    y, probs = random_case(1)
    m = compute_metrics(y, probs, CLASSES, n_boot=0)
    assert "f1_positive" not in m and "pr_auc" not in m and binary_line(m) == ""
    assert average_precision(np.zeros(4, bool), np.arange(4.0)) is None
    assert average_precision(np.array([1, 0, 1, 0], bool), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx((1 + 2 / 3) / 2)
    assert f1_positive(np.array([0, 0]), np.array([0, 0])) == 0.0  # no positive anywhere: 0, not NaN
    one_class = compute_metrics(np.zeros(5, int), np.tile([0.8, 0.2], (5, 1)), ["a", "b"], n_boot=0)
    assert one_class["pr_auc"] is None and "ROC AUC -" in binary_line(one_class)
