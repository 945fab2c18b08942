r"""Joint scores inside a group: the Taylor estimate of removing a *set* of labels.

Removing a set :math:`S` of one group's labels changes the loss of batch :math:`b` by
:math:`-\sum_{\ell \in S} t_b(\ell)` to first order, where :math:`t_b(\ell)` is the label's
per-batch gate derivative; Molchanov et al.'s estimate for a set is the square of that sum,
averaged over batches:

.. math::

    C(S) = \frac{1}{B} \sum_b \Big( \sum_{\ell \in S} t_b(\ell) \Big)^2 = 1_S^\top M \, 1_S,
    \qquad M = \frac{1}{B} \sum_b t_b t_b^\top

(:math:`M` is the group's block of the empirical Fisher matrix of the gates). Adding up the
single-label scores :math:`M_{\ell\ell}` keeps only the diagonal: for channels whose effects
on the loss move together (redundant channels, typically many of them in wide layers) removing
many costs far more than that sum, and the selectors, which add scores, empty such groups.
"""

from __future__ import annotations

import numpy as np

__all__ = ["joint_scores"]


def joint_scores(gram: np.ndarray) -> np.ndarray:
    r"""Per-label scores of one group whose prefix sums follow :math:`C(S)` (see the module).

    Labels are ordered greedily, each time the one whose removal adds least to the set's cost:

    .. math::

        \ell_k = \arg\min_{\ell \notin S_{k-1}} \; C(S_{k-1} \cup \{\ell\}) - C(S_{k-1})
               = 2 \, (M 1_{S_{k-1}})_\ell + M_{\ell\ell},

    and :math:`\ell_k` scores that marginal cost, raised where needed to stay above the score of
    :math:`\ell_{k-1}` (strictly, unless both are 0), so that sorting a group by score gives
    back the greedy order and the :math:`k` lowest scores add up to :math:`C(S_k)` (more where a
    marginal cost had to be raised: a first-order cancellation is not counted as a gain). The
    first label scores :math:`M_{\ell\ell}`, its single-label score; a label that never moves
    the loss (a zero row of :math:`M`) scores 0.

    Args:
        gram: :math:`M`, symmetric positive semi-definite, (n, n) for a group of n labels.

    Returns:
        n non-negative scores, in the group's label (channel) order.
    """
    gram = np.asarray(gram, dtype=np.float64)
    count = len(gram)
    diagonal = gram.diagonal()
    coupling = np.zeros(count)            # M 1_S for the labels already ordered
    ordered = np.zeros(count, dtype=bool)
    scores = np.zeros(count)
    previous = 0.0
    for _ in range(count):
        marginal = np.where(ordered, np.inf, 2.0 * coupling + diagonal)
        chosen = int(np.argmin(marginal))   # ties: the lowest channel, as the selectors break them
        value = max(float(marginal[chosen]), previous)
        if value == previous and previous > 0.0:
            value = float(np.nextafter(previous, np.inf))
        scores[chosen] = previous = value
        ordered[chosen] = True
        coupling += gram[chosen]
    return scores
