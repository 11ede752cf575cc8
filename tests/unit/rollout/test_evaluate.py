"""``axpo_rollout.evaluate`` against a scripted model, the real verifier (in process) and the
tiny checkpoint's real tokenizer: the loop it builds, questions in flight at once, the figures
it reports, and the errors it raises. tests/integration/test_eval.py runs it on the real
services."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence

import pytest

from axpo.contracts.domain import (
    FinishReason,
    Image,
    Reward,
    RewardWeights,
    Sample,
    SamplingParams,
    ScoreItem,
    TokenScores,
    ToolCall,
    ToolResult,
    ToolSpec,
)
from axpo.settings.job import JobSpec
from axpo.settings.verifier import VerifierSettings
from axpo.study import tasks
from axpo.study.tasks import Task
from axpo.study.tiny_model import build_tiny_model
from axpo_rollout.agent import AgentLoop, CancelToken, Vocab
from axpo_rollout.evaluate import (
    EvalArgumentError,
    eval_loop,
    eval_questions,
    eval_spec,
    evaluate,
)
from axpo_rollout.evaluate_metrics import QuestionResult
from axpo_verifier.verifier import Verifier

ZOOM_SCHEMA = {
    "type": "object",
    "properties": {"bbox_2d": {"type": "array", "items": {"type": "number"}}},
    "required": ["bbox_2d"],
}
ZOOM = ToolSpec("image_zoom_in_tool", "Zoom in.", json.dumps(ZOOM_SCHEMA))
VALID_CALL = (
    'Too small.\n</think>\n\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": '
    '{"bbox_2d": [0, 0, 500, 500]}}\n</tool_call>'
)
MALFORMED_CALL = "Too small.\n</think>\n\n<tool_call>\n{not json\n</tool_call>"


def answer(text: str) -> str:
    return f"So.\n</think>\n\n<answer>{text}</answer><|im_end|>"


def wrong(t: Task) -> str:
    return next(c for c in ("A", "B") if c != t.gold) if t.choices else str(int(t.gold) + 1)


class ScriptedModel:
    """A Backend whose "model" writes, for each question (found by its text in the prompt):
    a right answer, a wrong one (right too for ``colour_cell``), a valid zoom call then the
    right answer, a malformed call then a wrong answer. Records how many first turns are in
    flight at once."""

    def __init__(self, vocab: Vocab, verifier: Verifier, questions: Sequence[Task]) -> None:
        self.vocab, self.verifier = vocab, verifier
        self.by_text = {t.question: t for t in questions}
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.seeds: set[int | None] = set()
        self.fail_on: str | None = None
        self.slow_on: str | None = None

    def _task(self, prompt: Sequence[int]) -> Task:
        text = self.vocab.decode(prompt)
        [t] = [t for q, t in self.by_text.items() if q in text]
        return t

    def _sample(self, text: str) -> Sample:
        ids = tuple(self.vocab.encode(text))
        return Sample(ids, TokenScores(), FinishReason.STOP, policy_version=3)

    def generate(
        self,
        prompt: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        t = self._task(prompt)
        self.seeds.add(sampling.seed)
        if t.task_id == self.fail_on:
            raise ConnectionError("inference went away")
        if sampling.n > 1:  # the first turns of a question's group
            with self.lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            time.sleep(1.0 if t.task_id == self.slow_on else 0.1)
            with self.lock:
                self.in_flight -= 1
            second = answer(t.gold if t.family == "colour_cell" else wrong(t))
            texts = [answer(t.gold), second, VALID_CALL, MALFORMED_CALL]
            return [self._sample(x) for x in texts[: sampling.n]]
        # After a tool response: right after the valid call, wrong after the malformed one.
        history = self.vocab.decode(prompt)
        return [self._sample(answer(wrong(t) if "{not json" in history else t.gold))]

    def resume(self, *args: object, **kwargs: object) -> list[Sample]:
        raise AssertionError("an evaluation never resamples")

    def call_tool(self, call: ToolCall, images: Sequence[Image], timeout_s: float) -> ToolResult:
        return ToolResult(text="Zoomed.", images=(images[0],))

    def score(self, items: Sequence[ScoreItem], weights: RewardWeights) -> list[Reward]:
        return self.verifier.score(items, weights)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Vocab:
    return Vocab(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    with Verifier(VerifierSettings()) as v:
        yield v


def job(**rollout: object) -> JobSpec:
    spec = JobSpec(name="t", model="unused", seed=5)
    return spec.model_copy(
        update={
            "algorithm": spec.algorithm.model_copy(update={"name": "axpo", "group_size": 2}),
            "rollout": spec.rollout.model_copy(update={"max_turns": 3, **rollout}),
        }
    )


def test_questions_come_from_the_split_interleaved_by_family() -> None:
    qs = eval_questions(["zoom_digits", "colour_cell"], "heldout", 2, 128)
    assert [(q.family, q.seed) for q in qs] == [
        ("zoom_digits", tasks.HELDOUT_BASE),
        ("colour_cell", tasks.HELDOUT_BASE),
        ("zoom_digits", tasks.HELDOUT_BASE + 1),
        ("colour_cell", tasks.HELDOUT_BASE + 1),
    ]
    assert all(q.split == "heldout" for q in qs)
    with pytest.raises(EvalArgumentError, match="unknown task families \\['nope'\\]"):
        eval_questions(["zoom_digits", "nope"], "heldout", 2, 128)
    with pytest.raises(EvalArgumentError, match="unknown split 'test'"):
        eval_questions(["zoom_digits"], "test", 2, 128)
    with pytest.raises(EvalArgumentError, match="name a family twice"):
        eval_questions(["arith", "arith"], "heldout", 2, 128)
    with pytest.raises(EvalArgumentError, match=">= 1, got 0"):
        eval_questions(["arith"], "heldout", 0, 128)


def test_the_eval_spec_samples_n_without_resampling_and_keeps_the_rest() -> None:
    spec = job(temperature=0.7, max_new_tokens=99)
    e = eval_spec(spec, 1, temperature=0.3)
    assert (e.algorithm.name, e.algorithm.group_size) == ("grpo", 1)
    assert e.rollout.temperature == 0.3
    assert e.rollout.max_new_tokens == 99
    assert e.rollout.system_prompt == spec.rollout.system_prompt
    assert e.rollout.tools == spec.rollout.tools
    assert eval_spec(spec, 8).rollout.temperature == 0.7
    with pytest.raises(EvalArgumentError, match=r"n must be in \[1, 256\]"):
        eval_spec(spec, 0)
    with pytest.raises(EvalArgumentError, match="temperature must be > 0"):
        eval_spec(spec, 4, temperature=0.0)


def test_evaluate_reports_every_figure(vocab: Vocab, verifier: Verifier) -> None:
    questions = eval_questions(["zoom_digits", "colour_cell"], "heldout", 2, 128)
    model = ScriptedModel(vocab, verifier, questions)
    loop = eval_loop(model, [ZOOM], job(), 4, vocab=vocab)
    seen: list[QuestionResult] = []
    result = evaluate(loop, questions, [1, 2, 4], inflight=2, on_question=seen.append)

    assert model.most_in_flight == 2  # two questions sampled at once, never more
    assert model.seeds == {None}  # independent samples: no fixed sampling seed
    assert sorted(r.task_id for r in seen) == sorted(q.task_id for q in questions)
    assert [r.task_id for r in result.questions] == [q.task_id for q in questions]
    assert result.policy_versions == (3,)
    for r in result.questions:
        assert [s.correct for s in r.samples] == [True, r.family == "colour_cell", True, False]
        assert [[c.valid for c in s.tool_calls] for s in r.samples] == [[], [], [True], [False]]
    s = result.summary
    z, c = s["families"]["zoom_digits"], s["families"]["colour_cell"]
    assert (z["questions"], z["n"], c["questions"]) == (2, 4, 2)
    assert z["pass_at_1"] == 0.5
    assert c["pass_at_1"] == 0.75
    assert z["pass_at_2"] == pytest.approx(1 - 1 / 6, abs=1e-6)  # 2 of 4 right
    assert c["pass_at_2"] == 1.0  # 3 of 4 right: any 2 hold one
    assert s["pass_at_4"] == 1.0
    assert s["accuracy"] == pytest.approx(5 / 8)
    assert s["tool_call_rate"] == 0.5
    assert s["tool_call_valid_rate"] == 0.5
    assert s["accuracy_with_tools"] == 0.5
    assert z["accuracy_without_tools"] == 0.5
    assert c["accuracy_without_tools"] == 1.0
    assert s["mean_generated_tokens"] > 0
    assert s["chance"] == pytest.approx((0.25 + questions[1].chance) / 2, abs=1e-6)
    records = result.records()
    assert [r["task_id"] for r in records] == [q.task_id for q in questions]
    assert records[1]["family"] == "colour_cell"
    assert records[1]["pass_at_4"] == 1.0


def test_a_failing_question_is_named_and_no_more_start(vocab: Vocab, verifier: Verifier) -> None:
    questions = eval_questions(["zoom_digits"], "heldout", 6, 128)
    model = ScriptedModel(vocab, verifier, questions)
    # The first question is still sampling when the second fails: its place must not go to
    # the third.
    model.slow_on = questions[0].task_id
    model.fail_on = questions[1].task_id
    loop = eval_loop(model, [ZOOM], job(), 2, vocab=vocab)
    seen: list[QuestionResult] = []
    with pytest.raises(RuntimeError, match=f"evaluating {questions[1].task_id} failed"):
        evaluate(loop, questions, [1], inflight=2, on_question=seen.append)
    assert [r.task_id for r in seen] == [questions[0].task_id]


def test_evaluate_refuses_what_it_cannot_measure(vocab: Vocab, verifier: Verifier) -> None:
    questions = eval_questions(["zoom_digits"], "heldout", 1, 128)
    model = ScriptedModel(vocab, verifier, questions)
    axpo_loop = AgentLoop(model, vocab, job(), [ZOOM])
    with pytest.raises(EvalArgumentError, match="without resampling"):
        evaluate(axpo_loop, questions, [1])
    loop = eval_loop(model, [ZOOM], job(), 4, vocab=vocab)
    with pytest.raises(EvalArgumentError, match=r"k = \[8\]"):
        evaluate(loop, questions, [1, 8])
    with pytest.raises(EvalArgumentError, match="no questions"):
        evaluate(loop, [], [1])
    with pytest.raises(EvalArgumentError, match="repeat a task_id"):
        evaluate(loop, [questions[0], questions[0]], [1])
    with pytest.raises(EvalArgumentError, match="inflight must be >= 1, got 0"):
        evaluate(loop, questions, [1], inflight=0)


def test_a_sampling_seed_is_only_sent_when_asked_for(vocab: Vocab, verifier: Verifier) -> None:
    questions = eval_questions(["zoom_digits"], "heldout", 1, 128)
    model = ScriptedModel(vocab, verifier, questions)
    evaluate(eval_loop(model, [ZOOM], job(), 4, vocab=vocab, seed=11), questions, [1])
    assert model.seeds == {11}


def test_the_default_loop_reads_the_job_model_tokenizer(vocab: Vocab, verifier: Verifier) -> None:
    with pytest.raises(FileNotFoundError, match=r"unused/tokenizer\.json"):
        eval_loop(ScriptedModel(vocab, verifier, []), [ZOOM], job(), 2)
