"""One rollout, turn by turn: :class:`RolloutRunner` (the base of
:class:`~axpo_rollout.agent.loop.AgentLoop`).

The prompt (system turn with the tool schemas, the question with its image, the generation
prompt ``<|im_start|>assistant\\n<think>\\n``) is rendered once by
:func:`axpo.contracts.chat.render_prompt` and tokenized. Then, per assistant turn: generate until
``</tool_call>`` (a stop token) or end of turn; if the turn closed a tool call, parse it, run
it, and append ``<|im_end|>\\n`` + the tool-response user turn + the generation prompt, rendered
and tokenized as one *delta*; repeat up to ``max_turns`` turns or ``max_total_tokens`` tokens.
Sampled tokens are kept exactly as sampled, with their logprobs and entropies; past turns are
never re-rendered from text. The last turn's text is scored by the verifier.

Deliberate differences from what the chat template renders for the same conversation
(tests/unit/rollout/test_agent.py checks the rest is identical):

- Earlier turns keep their ``<think>`` blocks. Qwen's template strips the reasoning of
  assistant turns before the last user query; training must see what was sampled.
- A tool-call turn ends at ``</tool_call>`` (the stop token), and ``<|im_end|>\\n`` is appended
  as template: one tool call per turn, and the model is not trained to emit that ``<|im_end|>``.
- Tool-call bytes are the model's own (the template would re-serialize the arguments).

**Segments.** ``PROMPT``; per tool turn ``THINK`` (everything the model wrote before the
``<tool_call>`` token, thinking and any visible text) and ``TOOL_CALL`` (``<tool_call>`` ..
``</tool_call>``), then ``TOOL_RESPONSE`` (the appended delta, template tokens, no loss); the
final turn ``THINK`` up to and including ``</think>`` and ``ANSWER`` after it. Model-written
segments carry the policy version of the generation call that produced them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from axpo.contracts import chat
from axpo.contracts.domain import (
    FinishReason,
    Reward,
    Sample,
    SamplingParams,
    ScoreItem,
    SegmentKind,
    ToolCall,
    ToolError,
    ToolErrorKind,
    ToolInvocation,
    ToolResult,
    ToolSpec,
)
from axpo.settings.job import JobSpec
from axpo.study.tasks import Task
from axpo_rollout.agent.backend import Backend, PromptTooLongError
from axpo_rollout.agent.cancel import CancelToken
from axpo_rollout.agent.state import RolloutState, Timings
from axpo_rollout.agent.vocab import Vocab


def _malformed_call(call_id: str, raw: str) -> ToolCall:
    return ToolCall(call_id=call_id, name="", arguments_json=json.dumps({"raw": raw[:2000]}))


class RolloutRunner:
    """Runs rollouts for one job: the first state, each sampled turn, each tool call, and the
    verifier's scores; thread-safe."""

    def __init__(
        self,
        backend: Backend,
        vocab: Vocab,
        spec: JobSpec,
        tool_specs: Sequence[ToolSpec],
        *,
        pool: Executor | None = None,
        seed: int | None = None,
    ) -> None:
        self.backend = backend
        self.vocab = vocab
        self.spec = spec
        offered = set(spec.rollout.tools)
        known = {t.name for t in tool_specs}
        missing = sorted(offered - known)
        if missing:
            raise ValueError(
                f"job {spec.name}: rollout.tools {missing} not offered by the tool server "
                f"(it has {sorted(known)})"
            )
        self.tools = [t for t in tool_specs if t.name in offered]
        self.schemas: dict[str, Any] = {
            t.name: json.loads(t.parameters_json_schema) for t in self.tools
        }
        self.openai_tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": json.loads(t.parameters_json_schema),
                },
            }
            for t in self.tools
        ]
        self._own_pool = pool is None
        self.pool = pool or ThreadPoolExecutor(max_workers=64, thread_name_prefix="rollout")
        self._seed = seed
        self._delta_cache: dict[tuple[str, int], list[int]] = {}

    def close(self) -> None:
        """Release the threads this loop made (a worker following a deployment's jobs makes a
        loop per job); work not started is cancelled. A pool passed in is the caller's."""
        if self._own_pool and isinstance(self.pool, ThreadPoolExecutor):
            self.pool.shutdown(wait=False, cancel_futures=True)

    def sampling(self, n: int, max_tokens: int) -> SamplingParams:
        r = self.spec.rollout
        return SamplingParams(
            n=n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_tokens=max_tokens,
            stop_token_ids=(self.vocab.tool_call_close,) if self.tools else (),
            seed=self._seed,
        )

    def initial_state(self, task: Task) -> RolloutState:
        images = list(task.images)  # none for a text-only question
        text = chat.render_prompt(
            self.spec.rollout.system_prompt,
            self.openai_tools,
            task.question,
            image_count=len(images),
        )
        ids = self.vocab.encode(text)
        state = RolloutState([], [], [], [], [], images, prompt_length=len(ids))
        state.append(SegmentKind.PROMPT, ids)
        return state

    def _budget(self, state: RolloutState) -> int:
        r = self.spec.rollout
        return min(r.max_new_tokens, r.max_total_tokens - len(state.tokens))

    def add_turn(self, state: RolloutState, sample: Sample) -> bool:
        """Append one sampled assistant turn; True when it ended with a closed tool call that
        the loop should run (else the rollout is finished)."""
        ids = list(sample.token_ids)
        v = sample.policy_version
        lp = list(sample.scores.logprobs) or [0.0] * len(ids)
        ent = list(sample.scores.entropies) or [0.0] * len(ids)
        turn_start = next(
            (
                seg.end
                for seg in reversed(state.segments)
                if seg.kind in (SegmentKind.PROMPT, SegmentKind.TOOL_RESPONSE)
            ),
            0,
        )
        state.turns += 1
        is_call = bool(ids) and ids[-1] == self.vocab.tool_call_close and bool(self.tools)
        if is_call:
            opens = [i for i, t in enumerate(ids) if t == self.vocab.tool_call_open]
            start = opens[-1] if opens else len(ids) - 1
            cuts = [(SegmentKind.THINK, 0, start), (SegmentKind.TOOL_CALL, start, len(ids))]
        else:
            closes = [i for i, t in enumerate(ids) if t == self.vocab.think_close]
            end = closes[0] + 1 if closes else len(ids)
            cuts = [(SegmentKind.THINK, 0, end), (SegmentKind.ANSWER, end, len(ids))]
        for kind, a, b in cuts:
            state.append(
                kind,
                ids[a:b],
                version=v,
                trained=True,
                logprobs=lp[a:b],
                entropies=ent[a:b],
            )
        # The whole turn: a resumed turn starts inside the frozen prefix's thinking.
        state.last_text = self.vocab.decode(state.tokens[turn_start:])
        if sample.finish_reason == FinishReason.LENGTH or len(state.tokens) >= (
            self.spec.rollout.max_total_tokens
        ):
            state.truncated = True
            state.done = True
            return False
        if not is_call:
            state.done = True
            return False
        if state.turns >= self.spec.rollout.max_turns:
            state.truncated = True  # the turn budget ends it before its tool ran
            state.done = True
            return False
        return True

    def run_tool_turn(self, state: RolloutState, timings: Timings) -> None:
        """Run the call that ends ``state`` and append the tool-response delta."""
        call_segment = len(state.segments) - 1
        text = state.last_text
        call_id = f"call_{len(state.invocations)}"
        parsed = chat.parse_tool_calls(text, self.schemas, call_id_start=len(state.invocations))
        if not parsed:
            # The call sits inside the thinking (no `</think>` before it): not run.
            call = _malformed_call(call_id, text[text.rfind(chat.TOOL_CALL_OPEN) :])
            result = ToolResult(
                error=ToolError(
                    ToolErrorKind.MALFORMED_CALL,
                    "tool call inside the thinking: close </think> before calling a tool",
                )
            )
        else:
            p = parsed[-1]
            call = p.call or _malformed_call(call_id, p.raw)
            if p.error is not None:
                result = ToolResult(error=p.error)
            else:
                t0 = time.perf_counter()
                result = self.backend.call_tool(
                    call, state.images, self.spec.rollout.tool_timeout_s
                )
                timings.add("tools_s", time.perf_counter() - t0)
        state.invocations.append(ToolInvocation(call, result, call_segment))
        response_text = chat.tool_error_text(result.error) if result.error else result.text
        delta = (
            chat.END_OF_TURN
            + chat.render_tool_responses(
                [chat.ToolResponse(response_text, image_count=len(result.images))]
            )
            + chat.GENERATION_PROMPT
        )
        state.append(SegmentKind.TOOL_RESPONSE, self.vocab.encode(delta))
        state.images.extend(result.images)
        if len(state.tokens) >= self.spec.rollout.max_total_tokens:
            state.truncated = True
            state.done = True

    def continue_rollout(
        self, state: RolloutState, timings: Timings, cancel: CancelToken | None = None
    ) -> RolloutState:
        """Run tools and further turns until the rollout ends (state has at least one turn);
        raises :class:`Cancelled` when ``cancel`` fires."""
        while not state.done:
            if cancel is not None:
                cancel.check()
            self.run_tool_turn(state, timings)
            if state.done:
                break
            budget = self._budget(state)
            if budget < 1:
                state.truncated = state.done = True
                break
            t0 = time.perf_counter()
            try:
                [sample] = self.backend.generate(
                    state.tokens, state.images, self.sampling(1, budget), cancel=cancel
                )
            except PromptTooLongError:
                state.truncated = state.done = True
                break
            finally:
                timings.add("generate_s", time.perf_counter() - t0)
            self.add_turn(state, sample)
        return state

    def _first_turns(
        self, base: RolloutState, samples: Sequence[Sample]
    ) -> tuple[list[RolloutState], list[bool]]:
        """One rollout per sample continuing ``base``, and whether its turn called a tool."""
        states = [base.copy() for _ in samples]
        calls = [self.add_turn(s, sample) for s, sample in zip(states, samples, strict=True)]
        return states, calls

    def _branch(
        self,
        base: RolloutState,
        samples: Sequence[Sample],
        timings: Timings,
        cancel: CancelToken | None = None,
    ) -> list[RolloutState]:
        """One rollout per sample continuing ``base``, run concurrently on the pool (a rollout
        the sampled turn already finished comes straight back)."""
        states, _ = self._first_turns(base, samples)
        futures = [self.pool.submit(self.continue_rollout, s, timings, cancel) for s in states]
        return [f.result() for f in futures]

    def score(self, states: Sequence[RolloutState], task: Task, timings: Timings) -> list[Reward]:
        items = [
            ScoreItem(
                output=s.last_text,
                gold=task.gold,
                kind=task.kind,
                item_id=str(i),
                choices=task.choices,
                tool_calls=len(s.invocations),
            )
            for i, s in enumerate(states)
        ]
        t0 = time.perf_counter()
        try:
            return self.backend.score(items, self.spec.reward.weights())
        finally:
            timings.add("verify_s", time.perf_counter() - t0)
