"""The unbiased pass@k estimator (axpo.algorithm.pass_at_k) against brute-force enumeration of
every k-subset of the samples, known values, and its input errors."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from axpo.algorithm import mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if any(i < c for i in s))
    return Fraction(hits, len(subsets))


@st.composite
def nck(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(1, 10))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@given(nck())
def test_matches_enumerating_every_subset(args: tuple[int, int, int]) -> None:
    n, c, k = args
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_force(n, c, k)), abs=1e-15)


@given(nck())
def test_pass_at_one_is_the_share_correct_and_k_only_helps(args: tuple[int, int, int]) -> None:
    n, c, k = args
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    assert pass_at_k(n, c, k) >= pass_at_k(n, c, 1) - 1e-15
    assert pass_at_k(n, c, n) == (1.0 if c else 0.0)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (8, 3, 4, 1 - 5 / 70),  # C(5,4) = 5, C(8,4) = 70
        (8, 0, 4, 0.0),
        (8, 5, 4, 1.0),  # n - c = 3 < k: every draw holds a correct one
        (2, 1, 2, 1.0),
        (1000, 1, 1, 0.001),
    ],
)
def test_known_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_large_n_is_exact() -> None:
    n, c, k = 500, 7, 64
    from math import comb

    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == float(exact)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (4, 1, 5, "k > n"),
        (4, 1, 0, "k >= 1"),
        (0, 0, 1, "n >= 1"),
        (4, 5, 1, "0 <= c <= n"),
        (4, -1, 1, "0 <= c <= n"),
    ],
)
def test_bad_arguments_name_the_problem(n: int, c: int, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_mean_over_questions() -> None:
    # Per question: 1 - C(3,2)/C(4,2) = 0.5, 0, 1.
    assert mean_pass_at_k([(4, 1), (4, 0), (4, 4)], 2) == pytest.approx(0.5)
    assert mean_pass_at_k([(2, 1), (8, 2)], 1) == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="at least one question"):
        mean_pass_at_k([], 1)
    with pytest.raises(ValueError, match="k > n"):
        mean_pass_at_k([(8, 1), (2, 1)], 4)
