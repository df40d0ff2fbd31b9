"""DESIGN §4 metrics on hand-built cases."""

import math

import pytest
import torch

from trainable.metrics import classification_metrics, js_divergence, kd_alignment

LABELS = ["benign", "harmful"]


def _metrics(pred, attacked, noisy, y, p_s, p_t, hard=None):
    t = torch.tensor
    return classification_metrics(t(pred), t(attacked), t(noisy), t(y), t(p_s), t(p_t), LABELS,
                                  None if hard is None else t(hard))


def test_student_equal_to_teacher_scores_alignment_100():
    p = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    assert kd_alignment(p, p.clone()) == pytest.approx(100.0)


def test_opposite_one_hot_distributions_score_alignment_0():
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    assert js_divergence(p, q).item() == pytest.approx(math.log(2), rel=1e-5)
    assert kd_alignment(p, q) == pytest.approx(0.0, abs=1e-4)


def test_js_matches_hand_value():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    m = [0.7, 0.3]
    hand = 0.5 * sum(a * math.log(a / b) for a, b in zip([0.5, 0.5], m)) + 0.5 * sum(
        a * math.log(a / b) for a, b in zip([0.9, 0.1], m))
    assert js_divergence(p, q).item() == pytest.approx(hand, rel=1e-6)


def test_hand_built_predictions():
    # 4 items: y = benign, benign, harmful, harmful
    y = [0, 0, 1, 1]
    pred = [0, 1, 1, 1]        # 3/4 correct
    attacked = [0, 1, 0, 0]    # 1/4 correct under attack; 2/4 unchanged; both harmful flipped to benign
    noisy = [0, 0, 1, 0]       # 3/4 correct on noisy text
    p_t = [[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]]
    p_s = p_t
    m = _metrics(pred, attacked, noisy, y, p_s, p_t, hard=[False, True, True, False])
    assert m["accuracy"] == 75.0
    assert m["noise_robustness"] == 25.0
    assert m["alignment_stability"] == 50.0
    assert m["noisy_text_accuracy"] == 75.0
    assert m["kd_alignment"] == pytest.approx(100.0)
    assert m["teacher_agreement"] == 75.0
    assert m["safety_score"] == pytest.approx((100.0 + 25.0 + 50.0) / 3)
    assert m["harmful_recall"] == 100.0
    assert m["benign_pass_rate"] == 50.0
    assert m["attack_success_rate"] == 100.0
    assert m["hard_accuracy"] == 50.0
    assert all(0.0 <= v <= 100.0 for v in m.values())


def test_non_safety_labels_have_no_safety_metrics():
    t = torch.tensor
    m = classification_metrics(t([0, 1, 2]), t([0, 1, 2]), t([0, 1, 2]), t([0, 1, 2]),
                               torch.eye(3), torch.eye(3), ["negative", "neutral", "positive"])
    assert "harmful_recall" not in m and m["accuracy"] == 100.0


def test_item_metrics_on_a_resample_equals_metrics_of_the_subset():
    from trainable.metrics import item_metrics, split_items

    g = torch.Generator().manual_seed(0)
    n = 50
    y = torch.randint(0, 2, (n,), generator=g)
    pred, att, noisy = (torch.randint(0, 2, (n,), generator=g) for _ in range(3))
    p_s, p_t = torch.rand(n, 2, generator=g).softmax(-1), torch.rand(n, 2, generator=g).softmax(-1)
    hard = torch.rand(n, generator=g) < 0.3
    items = split_items(pred, att, noisy, y, p_s, p_t, hard)
    idx = torch.randint(0, n, (n,), generator=g)
    direct = classification_metrics(pred[idx], att[idx], noisy[idx], y[idx], p_s[idx], p_t[idx], LABELS, hard[idx])
    assert item_metrics(items, LABELS, idx) == pytest.approx(direct)
