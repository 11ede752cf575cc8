"""Pass@k: the chance that at least one of ``k`` samples of a question is correct, estimated
without bias from ``n >= k`` samples of which ``c`` were correct.

Drawing ``k`` of the ``n`` samples without replacement, every draw misses all ``c`` correct
ones with probability ``C(n - c, k) / C(n, k)``, so

    pass@k = 1 - C(n - c, k) / C(n, k)

(1 when ``n - c < k``: every draw holds a correct sample). Averaged over questions this is
an unbiased estimate of the model's pass@k, less noisy than sampling exactly ``k`` per
question. ``math.comb`` keeps the binomials exact (integers), and the one division of two
integers is correctly rounded, so the value is right to the last bit even for large ``n``.
Pure: no I/O.

>>> pass_at_k(n=4, c=1, k=1)
0.25
>>> pass_at_k(n=4, c=1, k=4)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _check(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n correct samples, got c={c}, n={n}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@{k} cannot be estimated from n={n} samples (k > n)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)``: one question's unbiased pass@k from ``n`` samples with
    ``c`` correct. Raises ValueError naming the bad argument (``n < 1``, ``c`` outside
    ``[0, n]``, ``k < 1`` or ``k > n``)."""
    _check(n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean of :func:`pass_at_k` over questions given as ``(n, c)`` pairs (each question may
    have its own ``n``). Raises ValueError when there are no questions, or as
    :func:`pass_at_k` does."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("mean pass@k needs at least one question")
    return math.fsum(values) / len(values)
