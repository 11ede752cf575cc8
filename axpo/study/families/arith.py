"""``arith`` (reasoning with code): a product of two numbers, computed with the ``python`` tool.

"What is 47 * 86?": a tiny model cannot multiply in its head, but it can copy the numbers into
``print(47 * 86)`` for the ``python`` tool and copy the printed result into its answer. Factors
are two-digit (10-99); the answer is the exact product (chance: one over the 3,000-odd distinct
products). Text only: no image.

Split by content: a pair whose sum is a multiple of 5 is held out, every other pair trains, so
no held-out question is a training question.
"""

from __future__ import annotations

from axpo.contracts.domain import AnswerKind
from axpo.study.task import Task, rng_for, split_of

FAMILY = "arith"
TOOL = "python"
LOW, HIGH = 10, 99
DISTINCT_PRODUCTS = len({a * b for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)})


def heldout_pair(a: int, b: int) -> bool:
    return (a + b) % 5 == 0


def generate(seed: int, image_size: int) -> Task:
    rng = rng_for(FAMILY, seed, 0)  # text only: the image size does not matter
    heldout = split_of(seed) == "heldout"
    while True:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if heldout_pair(a, b) == heldout:
            break
    product = a * b
    return Task(
        task_id=f"{FAMILY}-{seed}",
        question=f"What is {a} * {b}? Answer with the number.",
        image=None,
        gold=str(product),
        kind=AnswerKind.NUMBER,
        answer_text=str(product),
        family=FAMILY,
        seed=seed,
        tool=TOOL,
        tool_arguments={"code": f"print({a} * {b})"},
        chance=1 / DISTINCT_PRODUCTS,
    )
