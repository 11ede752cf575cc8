"""Per-token entropy estimated from the top-k logprobs vLLM returns.

vLLM gives, per generated token, the k most likely tokens and their logprobs under the full
distribution, not the distribution itself. With ``p_1 >= ... >= p_k`` the top-k
probabilities, ``r = 1 - sum(p_i)`` the tail mass left to the other ``V - k`` tokens, the
estimator is

    H_hat = -sum_i p_i log p_i  -  r log p_k

("the tail looks like the last top-k token"). Why this one:

- It is a lower bound of the true entropy: every tail token has ``p_j <= p_k``, so its term
  ``-p_j log p_j >= -p_j log p_k``, and the tail terms add up to at least ``-r log p_k``.
  An estimate never claims more uncertainty than the model has.
- It is exact when the top-k hold all the mass (``r = 0``: greedy-peaked tokens, top-k/top-p
  filtered sampling with processed logprobs) and when the tail is made of tokens as likely as
  the k-th one.
- It does not throw the tail away. The two common alternatives do: the truncated sum
  ``-sum p_i log p_i`` (also a lower bound, but looser by ``-r log p_k``), and the entropy of
  the renormalized top-k, which is capped at ``log k`` and calls a flat distribution over
  thousands of tokens as certain as one over k (it can also exceed the true entropy).
- The matching upper bound is ``-sum p_i log p_i + r log((V - k) / r)`` (tail spread evenly);
  it needs V and grows with the vocabulary, so it is not used.

AXPO ranks candidate prefixes by this estimate (docs/algorithm.md, "Uncertainty score"), so
what matters most is that it is monotone in the spread of the distribution and comparable
across tokens with the same k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """Entropy estimate (nats) from the top-k logprobs of one position, in any order.

    ``-inf`` entries (tokens filtered out by top-k/top-p) contribute nothing. An empty input
    gives 0.0.

    >>> round(topk_entropy([math.log(0.5), math.log(0.5)]), 6)  # all the mass: exact
    0.693147
    >>> round(topk_entropy([math.log(0.5), math.log(0.25)]), 6)  # tail 0.25 at p <= 0.25
    1.039721
    """
    probs = sorted((math.exp(lp) for lp in top_logprobs if lp > -math.inf), reverse=True)
    if not probs:
        return 0.0
    head = -sum(p * math.log(p) for p in probs if p > 0.0)
    tail = max(0.0, 1.0 - sum(probs))
    p_min = probs[-1]
    if tail <= 1e-7 or p_min <= 0.0:
        return max(0.0, head)
    return max(0.0, head - tail * math.log(p_min))
