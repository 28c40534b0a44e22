"""Classification metrics: accuracy and macro-averaged F1 (the mean of per-class F1 over the
classes that occur in the labels or the predictions)."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"accuracy: expected two equal non-empty lists, got {len(pred)} and {len(gold)}")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def macro_f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"macro_f1: expected two equal non-empty lists, got {len(pred)} and {len(gold)}")
    scores = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)
