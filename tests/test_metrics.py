"""The numpy metric functions against scikit-learn as the oracle, edge cases included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from edgekit import metrics as M
from edgekit.errors import DataError
from edgekit.evaluation import agreement, evaluate_outputs, infer_task, predicted_classes


def _sk_classification(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, object]:
    labels = np.union1d(y_true, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, s = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0)
        macro = skm.precision_recall_fscore_support(
            y_true, y_pred, average="macro", zero_division=0)
    return {"accuracy": skm.accuracy_score(y_true, y_pred), "macro": macro[:3],
            "labels": labels, "p": p, "r": r, "f": f, "s": s}


def _check_against_sklearn(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    ours = M.classification_report(y_true, y_pred)
    ref = _sk_classification(y_true, y_pred)
    assert ours.count == len(y_true)
    assert ours.accuracy == pytest.approx(ref["accuracy"], abs=1e-12)
    assert (ours.precision, ours.recall, ours.f1) == pytest.approx(ref["macro"], abs=1e-12)
    assert sorted(int(k) for k in ours.per_class) == [int(v) for v in ref["labels"]]
    for i, label in enumerate(ref["labels"]):
        row = ours.per_class[str(int(label))]
        assert row["precision"] == pytest.approx(ref["p"][i], abs=1e-12)
        assert row["recall"] == pytest.approx(ref["r"][i], abs=1e-12)
        assert row["f1"] == pytest.approx(ref["f"][i], abs=1e-12)
        assert row["support"] == ref["s"][i]
    n = int(max(y_true.max(), y_pred.max())) + 1
    sk_cm = skm.confusion_matrix(y_true, y_pred, labels=list(range(n)))
    np.testing.assert_array_equal(np.asarray(ours.confusion), sk_cm)


@pytest.mark.parametrize("seed", range(25))
def test_classification_matches_sklearn_on_random_labels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    classes = int(rng.integers(1, 12))
    y_true = rng.integers(0, classes, n)
    # Mostly right predictions with noise, so every regime (perfect, poor) appears.
    y_pred = np.where(rng.random(n) < rng.random(), y_true, rng.integers(0, classes + 2, n))
    _check_against_sklearn(y_true, y_pred)


def test_class_never_predicted_has_zero_precision() -> None:
    y_true = np.array([0, 1, 2, 2, 1, 0, 2])
    y_pred = np.array([0, 1, 1, 1, 1, 0, 0])
    _check_against_sklearn(y_true, y_pred)
    rep = M.classification_report(y_true, y_pred)
    assert rep.per_class["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}


def test_class_only_predicted_has_zero_recall() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 3, 1, 1])
    _check_against_sklearn(y_true, y_pred)
    assert M.classification_report(y_true, y_pred).per_class["3"]["support"] == 0


def test_single_class() -> None:
    y = np.full(9, 4)
    _check_against_sklearn(y, y)
    rep = M.classification_report(y, y)
    assert (rep.accuracy, rep.precision, rep.recall, rep.f1) == (1.0, 1.0, 1.0, 1.0)
    assert list(rep.per_class) == ["4"]


def test_num_classes_and_names_keep_absent_classes_out_of_the_macro() -> None:
    y_true = np.array([0, 1, 1])
    y_pred = np.array([0, 1, 0])
    rep = M.classification_report(y_true, y_pred, num_classes=4,
                                  class_names=["a", "b", "c", "d"])
    assert np.asarray(rep.confusion).shape == (4, 4)
    assert list(rep.per_class) == ["a", "b"]
    ref = _sk_classification(y_true, y_pred)
    assert (rep.precision, rep.recall, rep.f1) == pytest.approx(ref["macro"])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "needle"),
    [
        ([], [], "empty"),
        ([0, 1], [0], "2 labels but y_pred has 1"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0, -1], [0, 1], "negative"),
        ([0.5, 1.0], [0, 1], "integer class ids"),
    ],
)
def test_bad_classification_input_is_a_data_error(y_true: list, y_pred: list,
                                                  needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        M.classification_report(np.asarray(y_true), np.asarray(y_pred))


def test_labels_beyond_num_classes_are_rejected() -> None:
    with pytest.raises(DataError, match="outside the 3 classes"):
        M.confusion_matrix([0, 3], [0, 1], num_classes=3)


@pytest.mark.parametrize("seed", range(10))
def test_regression_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 50)),) + ((int(rng.integers(1, 4)),) if seed % 2 else ())
    y_true = rng.normal(size=shape)
    y_pred = y_true + rng.normal(scale=rng.random(), size=shape)
    rep = M.regression_report(y_true, y_pred)
    flat_t, flat_p = y_true.reshape(-1), y_pred.reshape(-1)
    assert rep.mae == pytest.approx(skm.mean_absolute_error(flat_t, flat_p), rel=1e-12)
    assert rep.rmse == pytest.approx(skm.root_mean_squared_error(flat_t, flat_p), rel=1e-12)
    assert rep.count == shape[0]


def test_regression_bad_input() -> None:
    with pytest.raises(DataError, match="empty"):
        M.regression_report([], [])
    with pytest.raises(DataError, match="shape"):
        M.regression_report(np.zeros((4, 2)), np.zeros((4, 3)))


@pytest.mark.parametrize("seed", range(5))
def test_cosine_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(20, 7))
    b = a + rng.normal(scale=0.5, size=a.shape)
    expected = np.diag(skm.pairwise.cosine_similarity(a, b))
    np.testing.assert_allclose(M.cosine_similarity(a, b), expected, atol=1e-12)
    assert agreement(a, b) == pytest.approx(expected.mean(), abs=1e-12)


def test_cosine_of_zero_rows() -> None:
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.0, 0.0], [0.0, 0.0]])
    # Two zero rows agree fully; a zero row against a non-zero row does not at all.
    np.testing.assert_array_equal(M.cosine_similarity(a, b), [1.0, 0.0])


def test_parity_against_sklearn_pieces() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(30, 5))
    cand = ref + rng.normal(scale=0.3, size=ref.shape)
    par = M.parity(ref, cand, classifier=True)
    assert par.max_abs_error == pytest.approx(np.abs(ref - cand).max())
    assert par.top1_agreement == pytest.approx(
        skm.accuracy_score(ref.argmax(1), cand.argmax(1)))
    assert par.mean_cosine == pytest.approx(
        np.diag(skm.pairwise.cosine_similarity(ref, cand)).mean())
    with pytest.raises(DataError):
        M.parity(ref, cand[:, :4], classifier=False)


def test_evaluate_outputs_on_logits_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(60, 6))
    labels = rng.integers(0, 6, 60)
    rep = evaluate_outputs(logits, labels)
    assert rep.task == "classification"
    ref = _sk_classification(labels, logits.argmax(1))
    assert rep.headline()["accuracy"] == pytest.approx(ref["accuracy"])
    assert rep.headline()["f1"] == pytest.approx(ref["macro"][2])
    assert np.asarray(rep.to_dict()["confusion"]).shape == (6, 6)


def test_evaluate_outputs_regression_and_task_inference() -> None:
    y = np.array([0.5, 1.5, 2.0])
    out = np.array([[0.4], [1.7], [2.0]])
    assert infer_task(out, y) == "regression"
    rep = evaluate_outputs(out, y)
    assert rep.headline()["mae"] == pytest.approx(skm.mean_absolute_error(y, out[:, 0]))
    # Whole-number float labels with score outputs are class ids.
    assert infer_task(np.zeros((3, 4)), np.array([0.0, 1.0, 3.0])) == "classification"


def test_evaluate_outputs_bad_input() -> None:
    with pytest.raises(DataError, match="no labels"):
        evaluate_outputs(np.zeros((2, 3)), None)
    with pytest.raises(DataError, match="no samples"):
        evaluate_outputs(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="3 model outputs but 2 labels"):
        evaluate_outputs(np.zeros((3, 3)), np.array([0, 1]))
    with pytest.raises(DataError, match="cannot read classes"):
        predicted_classes(np.zeros((3, 2, 2)))
