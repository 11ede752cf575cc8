"""The agent loop, token-in/token-out, and the group sampler (GRPO, plus AXPO's resampling).

No gRPC here: the loop talks to a :class:`Backend` (``axpo_rollout.clients`` implements it
over gRPC; tests may give any object with these methods).

**One rollout.** The prompt (system turn with the tool schemas, the question with its image,
the generation prompt ``<|im_start|>assistant\\n<think>\\n``) is rendered once by
:func:`axpo.chat.render_prompt` and tokenized. Then, per assistant turn: generate until
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

**A group** (:meth:`AgentLoop.run_group`). One ``n=G`` Generate for the first turn, then every
rollout continues on its own thread (generations of many rollouts and questions batch in
vLLM; tool calls overlap with other rollouts' generations). Then one batched Score. With
``algorithm.name == "axpo"`` and :func:`axpo.algorithm.needs_resampling`: candidates, the top
``rho`` by uncertainty, and for each kept prefix one ``ResumeFromPrefix`` with ``n=K`` whose
continuations run the same loop; the frozen prefix (tokens, logprobs, entropies, segments,
tool calls and images before the anchor call) is copied verbatim from the original.

**Speculative resampling** (``algorithm.speculative_resampling``, off by default, with
``tool_call_anchor: first``). The prefixes AXPO would keep depend only on the first turns
(:func:`axpo.algorithm.speculative_prefixes`): the tool users are the rollouts whose first turn
called a tool, and the uncertainty is measured on that call. So the loop starts those
``ResumeFromPrefix`` calls right after the first turn, while the originals still run; it
scores each tool-using original as soon as it finishes, and the moment one is correct (the
condition cannot hold) it cancels them (:class:`CancelToken`: the gRPC call is cancelled and
the inference service aborts the vLLM request; a continuation stops before its next turn).
If the condition holds once every original is scored, the speculative resamples are exactly
the ones the sequential order would have asked for (same prefixes, same counts), only
started earlier; a kept prefix without one (never, with ``anchor: first``) is resumed then.
A group's latency becomes about max(original, first turn + resample) instead of their sum.
:attr:`AgentLoop.speculation` counts launched, used and cancelled resumes.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from axpo import algorithm, chat
from axpo.config import JobSpec
from axpo.domain import (
    FinishReason,
    Group,
    Image,
    Reward,
    RewardWeights,
    Sample,
    SamplingParams,
    ScoreItem,
    Segment,
    SegmentKind,
    ToolCall,
    ToolError,
    ToolErrorKind,
    ToolInvocation,
    ToolResult,
    ToolSpec,
    Trajectory,
)
from axpo.tasks import Task

# --------------------------------------------------------------------------- backend


class Cancelled(Exception):
    """A generation the loop no longer needs was cancelled (raised by a Backend or the loop)."""


class CancelToken:
    """Cancels a speculative branch once: :meth:`cancel` runs every registered callback (a
    Backend registers the cancellation of its in-flight call); a callback registered after
    the fact runs at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def on_cancel(self, fn: Callable[[], object]) -> None:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(fn)
                return
        fn()

    def check(self) -> None:
        if self._cancelled:
            raise Cancelled("speculative resample cancelled: a tool-using rollout is correct")


class Backend(Protocol):
    """What the loop needs from the services. ``cancel``: when given and cancelled while the
    call is in flight, the call stops early and raises :class:`Cancelled`."""

    def generate(
        self,
        prompt: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]: ...

    def resume(
        self,
        prompt: Sequence[int],
        prefix: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]: ...

    def call_tool(
        self, call: ToolCall, images: Sequence[Image], timeout_s: float
    ) -> ToolResult: ...

    def score(self, items: Sequence[ScoreItem], weights: RewardWeights) -> list[Reward]: ...


class PromptTooLongError(ValueError):
    """The inference service refused a prompt as longer than its context: the rollout ends
    truncated (raised by a Backend)."""


# --------------------------------------------------------------------------- tokens


class Vocab:
    """The checkpoint's tokenizer (``tokenizer.json``, the Rust ``tokenizers`` library) and the
    ids of the tags the loop looks for, found by token string (never hard-coded)."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(checkpoint_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (the rollout loop needs it)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self._lock = threading.Lock()
        self.tool_call_open = self._id(chat.TOOL_CALL_OPEN)
        self.tool_call_close = self._id(chat.TOOL_CALL_CLOSE)
        self.think_close = self._id(chat.THINK_CLOSE)
        self.im_end = self._id(chat.IM_END)
        self.image_pad = self._id("<|image_pad|>")

    def _id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token")
        return int(tid)

    def encode(self, text: str) -> list[int]:
        with self._lock:  # the Rust tokenizer is not documented as thread-safe for encode
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))


# --------------------------------------------------------------------------- state


@dataclass
class Timings:
    generate_s: float = 0.0
    tools_s: float = 0.0
    verify_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)

    def merge(self, other: Timings) -> None:
        for name in ("generate_s", "tools_s", "verify_s"):
            self.add(name, getattr(other, name))


@dataclass
class SpeculationCounters:
    """Speculative AXPO resumes (one per kept prefix): started, kept in a group, cancelled."""

    launched: int = 0
    used: int = 0
    cancelled: int = 0


@dataclass
class _Speculation:
    future: Future[list[RolloutState]]
    token: CancelToken
    timings: Timings


@dataclass
class RolloutState:
    """A rollout under construction (one thread owns it)."""

    tokens: list[int]
    mask: list[bool]
    logprobs: list[float]
    entropies: list[float]
    segments: list[Segment]
    images: list[Image]
    prompt_length: int
    invocations: list[ToolInvocation] = field(default_factory=list)
    turns: int = 0
    last_text: str = ""
    truncated: bool = False
    done: bool = False

    def copy(self) -> RolloutState:
        return replace(
            self,
            tokens=list(self.tokens),
            mask=list(self.mask),
            logprobs=list(self.logprobs),
            entropies=list(self.entropies),
            segments=list(self.segments),
            images=list(self.images),
            invocations=list(self.invocations),
        )

    def append(
        self,
        kind: SegmentKind,
        ids: Sequence[int],
        *,
        version: int = 0,
        trained: bool = False,
        logprobs: Sequence[float] = (),
        entropies: Sequence[float] = (),
    ) -> None:
        if not ids:
            return
        start = len(self.tokens)
        self.tokens.extend(ids)
        self.mask.extend([trained] * len(ids))
        self.logprobs.extend(logprobs if logprobs else [0.0] * len(ids))
        self.entropies.extend(entropies if entropies else [0.0] * len(ids))
        self.segments.append(Segment(kind, start, len(self.tokens), version))

    def prefix(self, length: int, vocab: Vocab) -> RolloutState:
        """The state as it was after its first ``length`` tokens (a frozen thinking prefix ends
        where a model segment begins, so no segment is split except the last one)."""
        segs = []
        for seg in self.segments:
            if seg.start >= length:
                break
            segs.append(replace(seg, end=min(seg.end, length)))
        n_images = sum(1 for t in self.tokens[:length] if t == vocab.image_pad)
        return RolloutState(
            tokens=self.tokens[:length],
            mask=self.mask[:length],
            logprobs=self.logprobs[:length],
            entropies=self.entropies[:length],
            segments=segs,
            images=self.images[:n_images],
            prompt_length=self.prompt_length,
            # The cut is at the start of a tool call: every earlier call is whole, response
            # included, and the anchor call itself is not in the prefix.
            invocations=[inv for inv in self.invocations if inv.segment_index < len(segs)],
            turns=sum(1 for s in segs if s.kind == SegmentKind.TOOL_RESPONSE),
        )


# --------------------------------------------------------------------------- the loop


def _malformed_call(call_id: str, raw: str) -> ToolCall:
    return ToolCall(call_id=call_id, name="", arguments_json=json.dumps({"raw": raw[:2000]}))


class AgentLoop:
    """Samples groups for one job; thread-safe (one instance serves a whole worker)."""

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
        self.pool = pool or ThreadPoolExecutor(max_workers=64, thread_name_prefix="rollout")
        # Resume calls wait on continuations in ``pool``: they get threads of their own.
        self._resumers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="resume")
        self.speculation = SpeculationCounters()
        self._spec_lock = threading.Lock()
        self._seed = seed
        self._delta_cache: dict[tuple[str, int], list[int]] = {}

    # ------------------------------------------------------------------- pieces

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
        text = chat.render_prompt(
            self.spec.rollout.system_prompt, self.openai_tools, task.question, image_count=1
        )
        ids = self.vocab.encode(text)
        state = RolloutState([], [], [], [], [], [task.image], prompt_length=len(ids))
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

    # ------------------------------------------------------------------- a group

    def run_group(
        self,
        task: Task,
        *,
        group_id: str = "",
        on_resampling: Callable[[], object] | None = None,
    ) -> Group:
        """Sample, score and (AXPO) resample one question's group. ``on_resampling`` is called
        once the originals are scored, when all that is left is waiting on resamples (a
        worker then lets the next question start)."""
        started = time.perf_counter()
        timings = Timings()
        alg = self.spec.algorithm
        group_id = group_id or f"{self.spec.name}-{task.task_id}-{uuid.uuid4().hex[:8]}"
        base = self.initial_state(task)
        t0 = time.perf_counter()
        first = self.backend.generate(
            base.tokens, base.images, self.sampling(alg.group_size, self._budget(base))
        )
        timings.add("generate_s", time.perf_counter() - t0)
        states, callers = self._first_turns(base, first)
        speculative: dict[tuple[int, int, int], _Speculation] = {}
        if alg.name == "axpo" and alg.speculative_resampling and alg.tool_call_anchor == "first":
            speculative = self._speculate(group_id, states, callers)
        futures = [self.pool.submit(self.continue_rollout, s, timings) for s in states]
        try:
            rewards = self._score_originals(futures, callers, task, timings, speculative)
        except BaseException:
            self._cancel(speculative.values())
            raise
        trajectories = [
            _trajectory(f"{group_id}-{i}", f.result(), r)
            for i, (f, r) in enumerate(zip(futures, rewards, strict=True))
        ]
        images = {img.sha256: img for s in states for img in s.images}
        if alg.name == "axpo":
            resampled = self._resample(
                task, group_id, states, trajectories, timings, speculative, on_resampling
            )
            for traj, state in resampled:
                trajectories.append(traj)
                images.update((img.sha256, img) for img in state.images)
        versions = [
            seg.policy_version
            for t in trajectories
            for seg in t.segments
            if seg.kind in (SegmentKind.THINK, SegmentKind.TOOL_CALL, SegmentKind.ANSWER)
        ]
        timings_out = {
            "generate": timings.generate_s,
            "tools": timings.tools_s,
            "verify": timings.verify_s,
            "total": time.perf_counter() - started,
        }
        return Group(
            group_id=group_id,
            question_id=task.task_id,
            trajectories=tuple(trajectories),
            images=tuple(images.values()),
            policy_version=min(versions, default=0),
            job_id=self.spec.name,
            created_at=time.time(),
            timings=tuple(sorted(timings_out.items())),
        )

    def _speculate(
        self, group_id: str, states: Sequence[RolloutState], callers: Sequence[bool]
    ) -> dict[tuple[int, int, int], _Speculation]:
        """Start the resumes AXPO will want if its condition holds (module docstring), keyed by
        (rollout, prefix length, resamples). Call before the originals continue: the frozen
        prefixes are copied from their first-turn states here."""
        alg = self.spec.algorithm
        partial = [_trajectory(f"{group_id}-{i}", s, None) for i, s in enumerate(states)]
        kept = algorithm.speculative_prefixes(partial, callers, score=alg.uncertainty, rho=alg.rho)
        counts = algorithm.resample_counts(len(kept), alg.group_size, alg.resamples_per_prefix)
        out: dict[tuple[int, int, int], _Speculation] = {}
        for cand, k in zip(kept, counts, strict=True):
            frozen = states[cand.trajectory_index].prefix(cand.prefix_length, self.vocab)
            token, timings = CancelToken(), Timings()
            future = self._resumers.submit(self._resume, frozen, k, timings, token)
            out[(cand.trajectory_index, cand.prefix_length, k)] = _Speculation(
                future, token, timings
            )
        with self._spec_lock:
            self.speculation.launched += len(out)
        return out

    def _cancel(self, speculations: Iterable[_Speculation]) -> None:
        n = 0
        for s in speculations:
            if not s.token.cancelled:
                s.token.cancel()
                n += 1
        with self._spec_lock:
            self.speculation.cancelled += n

    def _score_originals(
        self,
        futures: Sequence[Future[RolloutState]],
        callers: Sequence[bool],
        task: Task,
        timings: Timings,
        speculative: dict[tuple[int, int, int], _Speculation],
    ) -> list[Reward]:
        """The originals' rewards, in order. With speculative resumes running, each tool user
        is scored as soon as it finishes and a correct one cancels them; the rest are scored
        in one batch at the end (without speculation: all in one batch)."""
        rewards: dict[int, Reward] = {}
        if speculative:
            index = {id(f): i for i, f in enumerate(futures)}
            users = [f for f, c in zip(futures, callers, strict=True) if c]
            for fut in as_completed(users):
                [reward] = self.score([fut.result()], task, timings)
                rewards[index[id(fut)]] = reward
                if reward.correct:
                    self._cancel(speculative.values())
        rest = [i for i in range(len(futures)) if i not in rewards]
        states = [futures[i].result() for i in rest]
        if states:
            rewards.update(zip(rest, self.score(states, task, timings), strict=True))
        return [rewards[i] for i in range(len(futures))]

    def _resample(
        self,
        task: Task,
        group_id: str,
        states: Sequence[RolloutState],
        originals: Sequence[Trajectory],
        timings: Timings,
        speculative: dict[tuple[int, int, int], _Speculation],
        on_resampling: Callable[[], object] | None = None,
    ) -> list[tuple[Trajectory, RolloutState]]:
        alg = self.spec.algorithm
        candidates = algorithm.prefix_candidates(
            originals, anchor=alg.tool_call_anchor, score=alg.uncertainty
        )
        kept = algorithm.select_prefixes(candidates, alg.rho)
        counts = algorithm.resample_counts(len(kept), alg.group_size, alg.resamples_per_prefix)
        pending: list[tuple[algorithm.PrefixCandidate, Future[list[RolloutState]]]] = []
        used: list[_Speculation] = []
        for cand, k in zip(kept, counts, strict=True):
            spec = speculative.pop((cand.trajectory_index, cand.prefix_length, k), None)
            if spec is not None:
                used.append(spec)
                pending.append((cand, spec.future))
            else:
                frozen = states[cand.trajectory_index].prefix(cand.prefix_length, self.vocab)
                pending.append((cand, self._resumers.submit(self._resume, frozen, k, timings)))
        self._cancel(speculative.values())  # not kept (the condition does not hold)
        with self._spec_lock:
            self.speculation.used += len(used)
        if pending and on_resampling is not None:
            on_resampling()
        resampled: list[tuple[algorithm.PrefixCandidate, RolloutState]] = []
        for cand, fut in pending:
            resampled += [(cand, s) for s in fut.result()]
        for spec in used:
            timings.merge(spec.timings)
        out: list[tuple[Trajectory, RolloutState]] = []
        if not resampled:
            return out
        rewards = self.score([s for _, s in resampled], task, timings)
        for j, ((cand, state), reward) in enumerate(zip(resampled, rewards, strict=True)):
            traj = _trajectory(f"{group_id}-r{j}", state, reward)
            traj = replace(
                traj, resampled_from=cand.trajectory_id, frozen_prefix_length=cand.prefix_length
            )
            out.append((traj, state))
        return out

    def _resume(
        self,
        frozen: RolloutState,
        k: int,
        timings: Timings,
        cancel: CancelToken | None = None,
    ) -> list[RolloutState]:
        budget = self._budget(frozen)
        if budget < 1:
            return []
        if cancel is not None:
            cancel.check()
        prompt = frozen.tokens[: frozen.prompt_length]
        prefix = frozen.tokens[frozen.prompt_length :]
        t0 = time.perf_counter()
        try:
            samples = self.backend.resume(
                prompt, prefix, frozen.images, self.sampling(k, budget), cancel=cancel
            )
        except PromptTooLongError:
            return []
        finally:
            timings.add("generate_s", time.perf_counter() - t0)
        return self._branch(frozen, samples, timings, cancel)


def _trajectory(tid: str, state: RolloutState, reward: Reward) -> Trajectory:
    traj = Trajectory(
        trajectory_id=tid,
        token_ids=tuple(state.tokens),
        loss_mask=tuple(state.mask),
        logprobs=tuple(state.logprobs),
        entropies=tuple(state.entropies),
        segments=tuple(state.segments),
        prompt_length=state.prompt_length,
        tool_calls=tuple(state.invocations),
        image_sha256=tuple(i.sha256 for i in state.images),
        reward=reward,
        truncated=state.truncated,
    )
    traj.validate()
    return traj


__all__ = [
    "AgentLoop",
    "Backend",
    "CancelToken",
    "Cancelled",
    "PromptTooLongError",
    "RolloutState",
    "SpeculationCounters",
    "Timings",
    "Vocab",
]
