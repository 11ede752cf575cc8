"""The agent loop (axpo_rollout.agent) against a scripted model, the real verifier and the
tiny checkpoint's real tokenizer and chat template.

The model is the one edge scripted here (what it "samples" is fixed text, tokenized on its
own as a model's tokens would be); tests/integration/test_rollout.py runs the same loop
against the real vLLM engine, tool server and verifier over gRPC.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image as PILImage

from axpo.algorithm.diagnostics import step_diagnostics
from axpo.contracts.domain import (
    FinishReason,
    Image,
    Reward,
    RewardWeights,
    Sample,
    SamplingParams,
    ScoreItem,
    SegmentKind,
    TokenScores,
    ToolCall,
    ToolErrorKind,
    ToolResult,
    ToolSpec,
)
from axpo.settings.job import AlgorithmSpec, JobSpec, RolloutSpec
from axpo.settings.verifier import VerifierSettings
from axpo.study.tasks import Task, generate_task
from axpo.study.tiny_model import build_tiny_model
from axpo_rollout.agent import (
    AgentLoop,
    Cancelled,
    CancelToken,
    SpeculationCounters,
    Timings,
    Vocab,
)
from axpo_verifier.verifier import Verifier

ZOOM_SCHEMA = {
    "type": "object",
    "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "label": {"type": "string"},
        "img_idx": {"type": "integer"},
    },
    "required": ["bbox_2d", "label"],
}
ZOOM = ToolSpec("image_zoom_in_tool", "Zoom into a region of an image.", json.dumps(ZOOM_SCHEMA))
CALL_ARGS = {"bbox_2d": [100, 200, 300, 400], "label": "box", "img_idx": 0}
CALL = (
    "The box is small.\n</think>\n\n<tool_call>\n"
    + json.dumps({"name": "image_zoom_in_tool", "arguments": CALL_ARGS})
    + "\n</tool_call>"
)


def answer(letter: str, thought: str = "So it is that.") -> str:
    return f"{thought}\n</think>\n\n<answer>{letter}</answer><|im_end|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def vocab(model_dir: Path) -> Vocab:
    return Vocab(model_dir)


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    with Verifier(VerifierSettings()) as v:
        yield v


@pytest.fixture(scope="module")
def task() -> Task:
    return generate_task("zoom_digits", seed=3, image_size=128)


def _png(color: str) -> Image:
    buf = io.BytesIO()
    PILImage.new("RGB", (64, 64), color).save(buf, format="PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


class Scripted:
    """A Backend whose model writes fixed text: ``first`` for the n first-turn samples,
    ``follow`` for every later turn (or a callable of the turn count), ``resumed`` for resumes."""

    def __init__(
        self,
        vocab: Vocab,
        verifier: Verifier,
        first: Sequence[str],
        follow: str,
        resumed: Sequence[str] = (),
        *,
        call_entropies: Sequence[float] = (),
    ) -> None:
        self.vocab, self.verifier = vocab, verifier
        self.first, self.follow, self.resumed = list(first), follow, list(resumed)
        self.call_entropies = list(call_entropies)
        self.tool_calls: list[ToolCall] = []
        self.resume_requests: list[tuple[list[int], list[int], int]] = []
        self.zoomed = _png("red")
        self._lock = threading.Lock()

    def _sample(self, text: str, index: int = 0, version: int = 0) -> Sample:
        ids = self.vocab.encode(text)
        entropy = self.call_entropies[index] if index < len(self.call_entropies) else 0.5
        return Sample(
            tuple(ids),
            TokenScores(logprobs=(-0.1,) * len(ids), entropies=(entropy,) * len(ids)),
            FinishReason.STOP,
            policy_version=version,
        )

    def generate(
        self,
        prompt: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        assert prompt.count(self.vocab.image_pad) == len(images)
        if sampling.n > 1 or not self.first_done:
            self.first_done = True
            return [self._sample(t, i) for i, t in enumerate(self.first[: sampling.n])]
        return [self._sample(self.follow, version=1)]

    first_done = False

    def resume(
        self,
        prompt: Sequence[int],
        prefix: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        assert (list(prompt) + list(prefix)).count(self.vocab.image_pad) == len(images)
        with self._lock:
            self.resume_requests.append((list(prompt), list(prefix), sampling.n))
        return [
            self._sample(self.resumed[i % len(self.resumed)], version=2) for i in range(sampling.n)
        ]

    def call_tool(self, call: ToolCall, images: Sequence[Image], timeout_s: float) -> ToolResult:
        with self._lock:
            self.tool_calls.append(call)
        return ToolResult(text="Zoomed.", images=(self.zoomed,))

    def score(self, items: Sequence[ScoreItem], weights: RewardWeights) -> list[Reward]:
        return self.verifier.score(items, weights)


def job(name: str = "axpo", g: int = 2, *, speculative: bool = False, **rollout: object) -> JobSpec:
    return JobSpec(
        name="t",
        model="unused",
        algorithm=AlgorithmSpec(
            name=name,  # type: ignore[arg-type]
            group_size=g,
            speculative_resampling=speculative,
        ),
        rollout=RolloutSpec(**rollout),  # type: ignore[arg-type]
    )


def test_tokens_match_the_chat_template_but_for_the_final_newline(
    vocab: Vocab, verifier: Verifier, task: Task, model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    backend = Scripted(vocab, verifier, [CALL, answer("A")], answer(task.gold, "It reads 42."))
    loop = AgentLoop(backend, vocab, job("grpo"), [ZOOM])
    group = loop.run_group(task)
    traj = group.trajectories[0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": loop.spec.rollout.system_prompt},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.question}]},
        {
            "role": "assistant",
            "reasoning_content": "The box is small.",
            "content": "",
            "tool_calls": [{"name": "image_zoom_in_tool", "arguments": CALL_ARGS}],
        },
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Zoomed."}]},
        {
            "role": "assistant",
            "reasoning_content": "It reads 42.",
            "content": f"<answer>{task.gold}</answer>",
        },
    ]
    rendered = tok.apply_chat_template(messages, tools=loop.openai_tools, tokenize=False)
    # Deliberate difference: the loop ends at the sampled <|im_end|>; the template adds "\n".
    assert rendered.endswith("<|im_end|>\n")
    assert vocab.decode(traj.token_ids) == rendered[:-1]
    # Token for token too: each piece (prompt, model turn, tool-response delta) was tokenized
    # on its own, and every boundary falls on an added token, so BPE merges agree.
    assert list(traj.token_ids) == tok(rendered[:-1], add_special_tokens=False)["input_ids"]


def test_segments_mask_scores_images_and_versions(
    vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    backend = Scripted(vocab, verifier, [CALL, answer("A")], answer(task.gold))
    group = AgentLoop(backend, vocab, job("grpo"), [ZOOM]).run_group(task)
    tool_user, direct = group.trajectories
    kinds = [s.kind for s in tool_user.segments]
    assert kinds == [
        SegmentKind.PROMPT,
        SegmentKind.THINK,
        SegmentKind.TOOL_CALL,
        SegmentKind.TOOL_RESPONSE,
        SegmentKind.THINK,
        SegmentKind.ANSWER,
    ]
    call_seg = tool_user.segments[2]
    assert tool_user.token_ids[call_seg.start] == vocab.tool_call_open
    assert tool_user.token_ids[call_seg.end - 1] == vocab.tool_call_close
    model = {SegmentKind.THINK, SegmentKind.TOOL_CALL, SegmentKind.ANSWER}
    for seg in tool_user.segments:
        span = range(seg.start, seg.end)
        assert all(tool_user.loss_mask[i] == (seg.kind in model) for i in span)
        assert all((tool_user.logprobs[i] == -0.1) == (seg.kind in model) for i in span)
    # Turn 1 was sampled at version 0, turn 2 at version 1; the group is as old as its oldest.
    assert [s.policy_version for s in tool_user.segments if s.kind in model] == [0, 0, 1, 1]
    assert group.policy_version == 0
    assert tool_user.tool_calls[0].segment_index == 2
    assert json.loads(tool_user.tool_calls[0].call.arguments_json) == CALL_ARGS
    assert tool_user.image_sha256 == (task.image.sha256, backend.zoomed.sha256)
    assert direct.image_sha256 == (task.image.sha256,)
    assert {i.sha256 for i in group.images} == {task.image.sha256, backend.zoomed.sha256}
    assert tool_user.reward is not None
    assert tool_user.reward.correct
    assert direct.reward is not None
    assert direct.reward.correct == (task.gold == "A")
    assert not tool_user.truncated
    assert dict(group.timings).keys() == {"generate", "tools", "verify", "total"}
    assert backend.tool_calls[0].name == "image_zoom_in_tool"


def _wrong(task: Task) -> str:
    return next(c for c in task.choices if c != task.gold)


@pytest.mark.parametrize("speculative", [True, False])
def test_axpo_resamples_the_most_uncertain_all_wrong_tool_prefix(
    speculative: bool, vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    wrong = _wrong(task)
    first = [CALL, CALL, answer(task.gold), answer(wrong)]
    backend = Scripted(
        vocab,
        verifier,
        first,
        answer(wrong),  # after zooming the model still answers wrong: all tool users wrong
        resumed=[answer(task.gold, "Actually I can see it.")],
        call_entropies=[0.2, 0.9, 0.1, 0.1],
    )
    loop = AgentLoop(backend, vocab, job("axpo", g=4, speculative=speculative), [ZOOM])
    group = loop.run_group(task)
    originals = [t for t in group.trajectories if not t.resampled_from]
    resamples = [t for t in group.trajectories if t.resampled_from]
    assert len(originals) == 4
    # 2 candidates, rho 0.25 keeps 1 (the more uncertain: rollout 1), K = G/2 = 2.
    assert len(resamples) == 2
    parent = originals[1]
    assert all(r.resampled_from == parent.trajectory_id for r in resamples)
    call_start = next(s.start for s in parent.segments if s.kind == SegmentKind.TOOL_CALL)
    for r in resamples:
        assert r.frozen_prefix_length == call_start
        k = r.frozen_prefix_length
        assert r.token_ids[:k] == parent.token_ids[:k]
        assert r.logprobs[:k] == parent.logprobs[:k]
        assert r.loss_mask[:k] == parent.loss_mask[:k]
        assert r.reward is not None
        assert r.reward.correct
        assert not r.tool_calls  # the resample answered directly
        assert [s.policy_version for s in r.segments if s.start >= k] == [2, 2]
    [(prompt, prefix, n)] = backend.resume_requests
    assert n == 2
    assert prompt + prefix == list(parent.token_ids[:call_start])
    assert len(prompt) == parent.prompt_length
    # Speculation or not, the one resume asked for is the one kept.
    launched = 1 if speculative else 0
    assert loop.speculation == SpeculationCounters(launched, launched, 0)


@pytest.mark.parametrize(("algorithm", "speculative"), [("grpo", False), ("axpo", False)])
def test_no_resampling_unless_the_tool_subgroup_is_all_wrong(
    algorithm: str, speculative: bool, vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    wrong = _wrong(task)
    # GRPO never resamples; AXPO does not when a tool user is correct.
    backend = Scripted(vocab, verifier, [CALL, CALL, answer(wrong)], answer(task.gold))
    loop = AgentLoop(backend, vocab, job(algorithm, g=3, speculative=speculative), [ZOOM])
    group = loop.run_group(task)
    assert not any(t.resampled_from for t in group.trajectories)
    assert backend.resume_requests == []
    if algorithm == "grpo":
        backend = Scripted(vocab, verifier, [CALL, CALL, answer(wrong)], answer(wrong))
        group = AgentLoop(backend, vocab, job("grpo", g=3), [ZOOM]).run_group(task)
        assert len(group.trajectories) == 3
        assert backend.resume_requests == []


class Gated(Scripted):
    """Scripted, but the originals' later turns wait (up to 5 s) for ``release``, and resumes
    wait until cancelled when ``resume_blocks``; records the cancel tokens it was given."""

    def __init__(self, *args: object, resume_blocks: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.release = threading.Event()
        self.resume_started = threading.Event()
        self.released_by_resume = False
        self.resume_blocks = resume_blocks
        self.tokens: list[CancelToken | None] = []

    def generate(
        self,
        prompt: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        if sampling.n == 1 and self.first_done and cancel is None:  # an original's 2nd turn
            self.released_by_resume = self.release.wait(5.0) or self.released_by_resume
        return super().generate(prompt, images, sampling, cancel=cancel)

    def resume(
        self,
        prompt: Sequence[int],
        prefix: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        self.tokens.append(cancel)
        self.resume_started.set()
        self.release.set()
        if self.resume_blocks:
            assert cancel is not None
            stopped = threading.Event()
            cancel.on_cancel(stopped.set)
            assert stopped.wait(10.0), "the speculative resume was never cancelled"
            raise Cancelled("cancelled")
        return super().resume(prompt, prefix, images, sampling, cancel=cancel)


def test_speculative_resampling_starts_while_the_originals_still_run(
    vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    wrong = _wrong(task)
    backend = Gated(
        vocab,
        verifier,
        [CALL, CALL, answer(wrong), answer(wrong)],
        answer(wrong),
        resumed=[answer(task.gold, "Now I see it.")],
        call_entropies=[0.9, 0.2, 0.1, 0.1],
    )
    loop = AgentLoop(backend, vocab, job("axpo", g=4, speculative=True), [ZOOM])
    group = loop.run_group(task)
    # The originals' second turns were held until a resume had started: it ran before they
    # finished (in sequence, each would have waited the full 5 s and found no resume).
    assert backend.released_by_resume
    resamples = [t for t in group.trajectories if t.resampled_from]
    assert len(resamples) == 2
    assert {r.resampled_from for r in resamples} == {group.trajectories[0].trajectory_id}
    assert all(r.reward is not None and r.reward.correct for r in resamples)
    assert loop.speculation == SpeculationCounters(launched=1, used=1, cancelled=0)
    [token] = backend.tokens
    assert token is not None
    assert not token.cancelled


def test_a_correct_tool_user_cancels_the_speculative_resample(
    vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    wrong = _wrong(task)
    # Both tool users answer correctly after zooming: the condition cannot hold, so the
    # resume (which blocks until cancelled) must be cancelled for the group to finish.
    backend = Gated(
        vocab,
        verifier,
        [CALL, CALL, answer(wrong)],
        answer(task.gold),
        resume_blocks=True,
    )
    loop = AgentLoop(backend, vocab, job("axpo", g=3, speculative=True), [ZOOM])
    group = loop.run_group(task)
    assert backend.resume_started.is_set()
    assert not any(t.resampled_from for t in group.trajectories)
    assert len(group.trajectories) == 3
    [token] = backend.tokens
    assert token is not None
    assert token.cancelled
    assert loop.speculation == SpeculationCounters(launched=1, used=0, cancelled=1)
    # Every original was scored, the tool users one by one as they finished.
    assert all(t.reward is not None for t in group.trajectories)
    assert [t.reward.correct for t in group.trajectories if t.reward] == [True, True, False]


def test_a_cancelled_token_stops_a_continuation_before_its_next_turn(
    vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    backend = Scripted(vocab, verifier, [CALL], answer(task.gold))
    loop = AgentLoop(backend, vocab, job("axpo", g=2), [ZOOM])
    state = loop.initial_state(task)
    [sample] = backend.generate(state.tokens, state.images, loop.sampling(1, 64))
    assert loop.add_turn(state, sample)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled, match="cancelled"):
        loop.continue_rollout(state, Timings(), token)
    assert backend.tool_calls == []  # stopped before running the tool
    late: list[str] = []
    token.on_cancel(lambda: late.append("ran"))  # registered after the fact: runs at once
    assert late == ["ran"]


def test_a_malformed_call_is_answered_with_an_error_and_not_run(
    vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    bad = (
        'Zoom.\n</think>\n\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {bbox'
        "\n</tool_call>"
    )
    backend = Scripted(vocab, verifier, [bad, answer("A")], answer(task.gold))
    group = AgentLoop(backend, vocab, job("grpo"), [ZOOM]).run_group(task)
    traj = group.trajectories[0]
    [inv] = traj.tool_calls
    assert inv.result.error is not None
    assert inv.result.error.kind == ToolErrorKind.MALFORMED_CALL
    assert backend.tool_calls == []
    response = next(s for s in traj.segments if s.kind == SegmentKind.TOOL_RESPONSE)
    text = vocab.decode(traj.token_ids[response.start : response.end])
    assert "Error (malformed_call)" in text


def test_string_arguments_are_a_malformed_call_of_that_tool(
    vocab: Vocab, verifier: Verifier, task: Task
) -> None:
    bad = (
        'Zoom.\n</think>\n\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": "[oops"}'
        "\n</tool_call>"
    )
    backend = Scripted(vocab, verifier, [bad, answer("A")], answer(task.gold))
    group = AgentLoop(backend, vocab, job("grpo"), [ZOOM]).run_group(task)
    [inv] = group.trajectories[0].tool_calls
    assert inv.call.name == "image_zoom_in_tool"  # recorded as a call of that tool
    assert json.loads(inv.call.arguments_json) == "[oops"
    assert inv.result.error is not None
    assert inv.result.error.kind == ToolErrorKind.MALFORMED_CALL
    assert backend.tool_calls == []
    record = step_diagnostics([group], learner_version=0)
    assert record["malformed_call_rate"] == 1.0  # the group's only call, counted as malformed


def test_turn_and_token_budgets_truncate(vocab: Vocab, verifier: Verifier, task: Task) -> None:
    backend = Scripted(vocab, verifier, [CALL, CALL], CALL)
    group = AgentLoop(backend, vocab, job("grpo", max_turns=2), [ZOOM]).run_group(task)
    for traj in group.trajectories:
        assert traj.truncated
        assert len(traj.tool_calls) == 1  # the second call hit the turn budget, not run
        assert traj.reward is not None
        assert not traj.reward.correct
    prompt_len = group.trajectories[0].prompt_length
    backend = Scripted(vocab, verifier, [CALL, CALL], CALL)
    tight = job("grpo", max_total_tokens=prompt_len + 40, max_turns=4)
    group = AgentLoop(backend, vocab, tight, [ZOOM]).run_group(task)
    assert all(t.truncated for t in group.trajectories)


def test_unknown_tools_in_the_job_are_refused(vocab: Vocab, verifier: Verifier) -> None:
    backend = Scripted(vocab, verifier, [], "")
    with pytest.raises(ValueError, match=r"rollout.tools \['python'\] not offered"):
        AgentLoop(backend, vocab, job("grpo", tools=["python"]), [ZOOM])
