"""kerastl.reports.evaluation: its numbers equal scikit-learn's and a hand computation; its text and warnings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import classification_report, confusion_matrix, log_loss, top_k_accuracy_score

from kerastl.errors import KerastlError
from kerastl.reports.evaluation import Evaluation, data_warnings, evaluate_predictions

NAMES = ["cat", "dog", "a rather long class name for a table", "bird"]


@pytest.fixture
def predictions() -> tuple[np.ndarray, np.ndarray]:
    """30 softmax rows over 4 classes, the true class favoured but often wrong."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 30)
    logits = rng.normal(size=(30, 4))
    logits[np.arange(30), labels] += 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, labels


def from_pairs(pairs: list[tuple[int, int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that predict the second of each (true, predicted) pair with 0.7."""
    labels, predicted = np.array(pairs).T
    probabilities = np.full((len(pairs), k), 0.3 / (k - 1))
    probabilities[np.arange(len(pairs)), predicted] = 0.7
    return probabilities, labels


def assert_matches_sklearn(evaluation: Evaluation, probabilities, labels, present: list[int]):
    predicted = probabilities.argmax(axis=1)
    report = classification_report(labels, predicted, labels=present, output_dict=True, zero_division=0)
    assert [row["class"] for row in evaluation.per_class] == [evaluation.class_names[c] for c in present]
    for row, c in zip(evaluation.per_class, present):
        expected = report[str(c)]
        assert row["precision"] == pytest.approx(expected["precision"], abs=1e-12)
        assert row["recall"] == pytest.approx(expected["recall"], abs=1e-12)
        assert row["f1"] == pytest.approx(expected["f1-score"], abs=1e-12)
        assert row["support"] == expected["support"]
    for ours, theirs in ((evaluation.macro_avg, "macro avg"), (evaluation.weighted_avg, "weighted avg")):
        assert ours["precision"] == pytest.approx(report[theirs]["precision"], abs=1e-12)
        assert ours["recall"] == pytest.approx(report[theirs]["recall"], abs=1e-12)
        assert ours["f1"] == pytest.approx(report[theirs]["f1-score"], abs=1e-12)
        assert ours["support"] == report[theirs]["support"]
    k = len(evaluation.class_names)
    assert evaluation.confusion_matrix == confusion_matrix(labels, predicted, labels=range(k)).tolist()


def test_scores_equal_sklearn_classification_report_matrix_and_log_loss(predictions):
    probabilities, labels = predictions
    evaluation = evaluate_predictions(probabilities, labels, NAMES, split="test")
    assert 0.3 < evaluation.accuracy < 0.95  # the fixture has mistakes, or the comparison proves little
    assert_matches_sklearn(evaluation, probabilities, labels, [0, 1, 2, 3])
    assert evaluation.accuracy == pytest.approx(np.mean(probabilities.argmax(axis=1) == labels))
    assert evaluation.loss == pytest.approx(log_loss(labels, probabilities, labels=range(4)), rel=1e-9)
    assert evaluation.count == 30 and evaluation.split == "test"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_accuracy_equals_sklearn(predictions, k):
    probabilities, labels = predictions
    evaluation = evaluate_predictions(probabilities, labels, NAMES, top_k=k)
    assert evaluation.top_k == k
    assert evaluation.top_k_accuracy == pytest.approx(top_k_accuracy_score(labels, probabilities, k=k,
                                                                           labels=range(4)))


def test_top_k_is_capped_at_the_number_of_classes():
    evaluation = evaluate_predictions([[0.8, 0.2], [0.3, 0.7]], [1, 1], ["a", "b"], top_k=5)
    assert evaluation.top_k == 2 and evaluation.top_k_accuracy == 1.0


def test_ece_and_reliability_equal_a_hand_computation():
    probabilities = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.35, 0.65], [0.6, 0.4]]
    labels = [0, 1, 1, 0, 0]
    # confidence, correct: 0.9 yes (bin 0.9-1.0), 0.8 no (0.8-0.9), 0.7 yes (0.7-0.8), 0.65 no, 0.6 yes (0.6-0.7)
    # bin 0.6: 2 rows, conf (0.65 + 0.6) / 2 = 0.625, acc 1/2 -> 2/5 * 0.125 = 0.05
    # bin 0.7: 1/5 * |1 - 0.7| = 0.06;  bin 0.8: 1/5 * |0 - 0.8| = 0.16;  bin 0.9: 1/5 * |1 - 0.9| = 0.02
    # ECE = 0.05 + 0.06 + 0.16 + 0.02 = 0.29
    evaluation = evaluate_predictions(probabilities, labels, ["a", "b"], bins=10)
    assert evaluation.ece == pytest.approx(0.29)
    reliability = evaluation.reliability
    assert reliability["edges"] == pytest.approx([i / 10 for i in range(11)])
    assert reliability["count"] == [0, 0, 0, 0, 0, 0, 2, 1, 1, 1]
    assert reliability["confidence"][:6] == [None] * 6
    assert reliability["confidence"][6:] == pytest.approx([0.625, 0.7, 0.8, 0.9])
    assert reliability["accuracy"][6:] == pytest.approx([0.5, 1.0, 0.0, 1.0])


def test_classes_missing_from_the_labels_get_no_row_but_keep_their_matrix_row_and_column(predictions):
    probabilities, labels = predictions
    keep = np.isin(labels, [0, 2])
    probabilities, labels = probabilities[keep], labels[keep]
    evaluation = evaluate_predictions(probabilities, labels, NAMES)
    assert [row["class"] for row in evaluation.per_class] == ["cat", NAMES[2]]
    assert_matches_sklearn(evaluation, probabilities, labels, [0, 2])
    matrix = np.array(evaluation.confusion_matrix)
    assert matrix.shape == (4, 4) and matrix[[1, 3]].sum() == 0 and matrix.sum() == len(labels)
    assert matrix[:, [1, 3]].sum() > 0  # absent classes can still be predicted


def test_one_sigmoid_unit_is_read_as_two_classes():
    p = np.array([[0.2], [0.9], [0.6], [0.4]])
    labels = np.array([0, 1, 0, 1])
    evaluation = evaluate_predictions(p, labels, ["no", "yes"])
    two = np.concatenate([1 - p, p], axis=1)
    assert evaluation.accuracy == 0.5
    assert evaluation.confusion_matrix == [[1, 1], [1, 1]]
    assert evaluation.loss == pytest.approx(log_loss(labels, two))
    assert evaluation.to_dict() == evaluate_predictions(two, labels, ["no", "yes"]).to_dict()


def test_most_wrong_lists_wrong_predictions_most_confident_first_up_to_the_limit():
    probabilities = [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9], [0.2, 0.7, 0.1], [0.5, 0.25, 0.25]]
    labels = [1, 1, 0, 2, 0]
    evaluation = evaluate_predictions(probabilities, labels, ["a", "b", "c"])
    assert [row["index"] for row in evaluation.most_wrong] == [2, 3, 0]
    assert evaluation.most_wrong[0] == {"index": 2, "true": "a", "predicted": "c", "confidence": 0.9}
    limited = evaluate_predictions(probabilities, labels, ["a", "b", "c"], wrong=2)
    assert limited.most_wrong == evaluation.most_wrong[:2]


def test_weak_classes_are_those_more_than_a_tenth_below_macro_f1_worst_first():
    # F1 per class: 0.741, 0.714, 0.571, 0.333, 0.947, 1.0; macro 0.718, so the bar is 0.618.
    # "dog" (0.714) is below the macro F1 but within 0.1 of it: not weak.
    pairs = ([(0, 0)] * 10 + [(1, 1)] * 10 + [(2, 2)] * 4 + [(2, 0)] * 6 + [(3, 3)] * 2 + [(3, 1)] * 8
             + [(4, 4)] * 9 + [(4, 0)] * 1 + [(5, 5)] * 10)
    names = ["cat", "dog", "cow", "pig", "hen", "fox"]
    evaluation = evaluate_predictions(*from_pairs(pairs, 6), names)
    assert evaluation.macro_avg["f1"] == pytest.approx(0.718, abs=1e-3)
    assert evaluation.weak_classes == ["pig", "cow"]


def test_weak_classes_are_at_most_five():
    # classes 0-5 always right, classes 6-11 always predicted as class 0: six classes at F1 0
    pairs = [(c, c) for c in range(6) for _ in range(5)] + [(c, 0) for c in range(6, 12) for _ in range(5)]
    evaluation = evaluate_predictions(*from_pairs(pairs, 12), [f"c{i}" for i in range(12)])
    assert len(evaluation.weak_classes) == 5
    assert set(evaluation.weak_classes) < {f"c{i}" for i in range(6, 12)}


def test_to_dict_from_dict_round_trips_through_json(predictions):
    evaluation = evaluate_predictions(*predictions, NAMES, split="cross-validation")
    text = json.dumps(evaluation.to_dict())
    assert Evaluation.from_dict(json.loads(text)) == evaluation


def test_from_dict_refuses_unknown_keys(predictions):
    values = evaluate_predictions(*predictions, NAMES).to_dict()
    with pytest.raises(KerastlError, match="unknown"):
        Evaluation.from_dict({**values, "extra": 1})


def test_format_names_every_class_and_the_scores(predictions):
    evaluation = evaluate_predictions(*predictions, NAMES, split="test")
    text = evaluation.format()
    for name in ["cat", "dog", "bird", "a rather long"]:
        assert name in text
    assert f"accuracy {evaluation.accuracy:.4f}" in text and "test" in text
    assert f"ECE {evaluation.ece:.4f}" in text and "macro avg" in text and "weighted avg" in text
    assert "cat" in text.split("weak classes")[1]  # the fixture's weakest class is listed at the end


def test_format_of_many_classes_lists_the_top_confusions_instead_of_a_matrix():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 3)
    probabilities = rng.dirichlet(np.ones(30), size=90)
    evaluation = evaluate_predictions(probabilities, labels, [f"class_{i:02d}" for i in range(30)])
    text = evaluation.format()
    assert all(f"class_{i:02d}" in text for i in range(30))
    assert "most frequent confusions" in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_no_labels_is_a_one_line_kerastl_error():
    with pytest.raises(KerastlError) as raised:
        evaluate_predictions(np.zeros((0, 3)), np.zeros(0, dtype=int), ["a", "b", "c"], split="test")
    assert "\n" not in str(raised.value) and "test" in str(raised.value)


def test_data_warnings_name_a_small_class_and_an_imbalance():
    warnings = data_warnings({"train": [50, 4, 60], "validation": [5, 1, 6]}, ["cat", "dog", "bird"])
    assert len(warnings) == 2
    assert "class 'dog' has 4 training images" in warnings[0]
    assert "'bird'" in warnings[1] and "'dog'" in warnings[1] and "15.0:1" in warnings[1]


def test_data_warnings_call_a_class_small_below_the_threshold_not_at_it():
    warnings = data_warnings({"train": [10, 9, 12]}, ["cat", "dog", "bird"], small=10)
    assert warnings == [warnings[0]] and "class 'dog' has 9 training images" in warnings[0]


def test_data_warnings_flag_imbalance_without_a_small_class():
    warnings = data_warnings({"train": [100, 20]}, ["cat", "dog"])
    assert len(warnings) == 1 and "5.0:1" in warnings[0]


def test_data_warnings_say_nothing_for_a_balanced_set():
    assert data_warnings({"train": [20, 22, 25], "validation": [5, 5, 6], "test": [5, 6, 5]}, ["a", "b", "c"]) == []
