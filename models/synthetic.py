"""Labelled examples drawn from a known logistic model, to check that a learner reaches the best
score any model can: the true probability of each example is known, so the Bayes AUC and the
perfect calibration are known too.

>>> task = LogisticTask(weights={"views": 0.8, "carts": 1.5}, bias=-2.0, seed=1)
>>> x, y, p = next(task.examples())
>>> sorted(x), type(y), 0.0 < p < 1.0
(['carts', 'views'], <class 'bool'>, True)

The truth scores themselves, on their own labels, give the optimum a learner is measured against:

>>> ex = list(task.examples(4000))
>>> auc = exact_auc([p for _, _, p in ex], [y for _, y, _ in ex])
>>> 0.5 < auc < 1.0
True
>>> abs(expected_auc([p for _, _, p in ex]) - auc) < 0.03  # the same, with no label noise
True
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

# how each input is drawn: counts (Poisson) and amounts (log-normal), as marketing features are
KINDS = ("count", "amount", "rate")


class LogisticTask:
    """Examples (x, y, p): x a dict of inputs, p = sigmoid(bias + sum w_i * x_i), y ~ Bernoulli(p).

    ``kinds`` says how each input is drawn (default: every input a count with mean 2).
    ``change_at`` and ``weights_after`` switch the true weights after that many examples: drift.
    """

    def __init__(self, weights: dict[str, float], bias: float, seed: int = 0,
                 kinds: dict[str, str] | None = None, change_at: int | None = None,
                 weights_after: dict[str, float] | None = None):
        self.weights, self.bias = dict(weights), bias
        self.kinds = {name: (kinds or {}).get(name, "count") for name in weights}
        unknown = set(self.kinds.values()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown input kinds {sorted(unknown)} (known: {KINDS})")
        self.change_at, self.weights_after = change_at, weights_after
        self.rng = random.Random(seed)

    def _draw(self, kind: str) -> float:
        rng = self.rng
        if kind == "count":
            return float(_poisson(rng, 2.0))
        if kind == "amount":
            return round(math.exp(rng.gauss(3.0, 0.8)) / 10, 2)
        return rng.random()

    def probability(self, x: dict[str, float], weights: dict[str, float]) -> float:
        z = self.bias + sum(w * x[name] for name, w in weights.items())
        return 1.0 / (1.0 + math.exp(-z))

    def examples(self, n: int | None = None) -> Iterator[tuple[dict[str, float], bool, float]]:
        i = 0
        while n is None or i < n:
            weights = self.weights
            if self.change_at is not None and i >= self.change_at:
                weights = self.weights_after or weights
            x = {name: self._draw(kind) for name, kind in self.kinds.items()}
            p = self.probability(x, weights)
            yield x, self.rng.random() < p, p
            i += 1


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: fine for the small means used here
    limit, k, prod = math.exp(-lam), 0, rng.random()
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


def exact_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC by ranks (ties count one half): the share of (positive, negative) pairs ranked
    right. Written from the definition, independently of River, as the tests' oracle.

    >>> exact_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, pos, i = 0.0, 0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mid = (i + j) / 2 + 1  # the average rank of a run of ties
        for k in range(i, j + 1):
            if labels[order[k]]:
                rank_sum += mid
                pos += 1
        i = j + 1
    neg = len(order) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def expected_auc(probabilities: Sequence[float]) -> float:
    """The AUC the true probabilities get on average over the labels they would draw: each
    example counts as a positive with weight p and a negative with weight 1 - p.

    >>> round(expected_auc([0.0, 1.0]), 6)
    1.0
    """
    order = sorted(probabilities)
    # sum over pairs i != j of p_i (1 - p_j) [p_i > p_j] (+ half on ties), over the same sums
    # without the order: one pass, accumulating the negatives' weight below each score
    neg_below, good, i = 0.0, 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and order[j + 1] == order[i]:
            j += 1
        run = order[i:j + 1]
        pos_w = sum(run)
        neg_w = sum(1 - p for p in run)
        tie = pos_w * neg_w - sum(p * (1 - p) for p in run)  # pairs within the run, i != j
        good += pos_w * neg_below + 0.5 * tie
        neg_below += neg_w
        i = j + 1
    total_pos, total_neg = sum(order), sum(1 - p for p in order)
    pairs = total_pos * total_neg - sum(p * (1 - p) for p in order)
    return good / pairs if pairs else float("nan")
