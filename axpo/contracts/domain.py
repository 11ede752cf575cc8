"""Domain types: what the system talks about, as plain frozen dataclasses.

Protobuf is the wire format (``axpo.v1``); these types are what the code works with.
``axpo.contracts.convert`` holds the one pair of converters per type. Sequences are tuples so
values are hashable and cannot be mutated behind a caller's back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum


class AnswerKind(StrEnum):
    """Which checker scores an item."""

    CHOICE = "choice"
    NUMBER = "number"
    TEXT = "text"
    MATH = "math"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    ABORT = "abort"


class ToolErrorKind(StrEnum):
    BAD_ARGUMENTS = "bad_arguments"
    TIMEOUT = "timeout"
    RESOURCE_LIMIT = "resource_limit"
    SANDBOX_VIOLATION = "sandbox_violation"
    INTERNAL = "internal"
    UNKNOWN_TOOL = "unknown_tool"
    MALFORMED_CALL = "malformed_call"


class SegmentKind(StrEnum):
    PROMPT = "prompt"
    THINK = "think"
    TOOL_CALL = "tool_call"
    TOOL_RESPONSE = "tool_response"
    ANSWER = "answer"
    TEMPLATE = "template"


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Image:
    """An encoded image addressed by the SHA-256 of its bytes.

    ``data`` may be empty for a reference to an image the receiver already holds.

    >>> img = Image.from_bytes(b"\\x89PNG...", "image/png")
    >>> img.sha256[:8]
    '20bb5226'
    """

    sha256: str
    data: bytes = b""
    mime_type: str = ""

    @classmethod
    def from_bytes(cls, data: bytes, mime_type: str) -> Image:
        return cls(sha256=hashlib.sha256(data).hexdigest(), data=data, mime_type=mime_type)

    def reference(self) -> Image:
        """The same image without its bytes."""
        return Image(sha256=self.sha256)


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0


@dataclass(frozen=True)
class LogprobProcessing:
    """How the inference engine turned logits into the logprobs it reported: ``logit_bias``
    added to ``biased_token_ids``, logits divided by ``temperature``, then top-k (0: off) and
    top-p (1: off) filtering; ``processed`` logprobs are of that distribution (vLLM's
    ``processed_logprobs``), otherwise of the raw logits. The learner computes its logprobs
    the same way (``axpo_learner.logprobs``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    biased_token_ids: tuple[int, ...] = ()
    logit_bias: float = 0.0
    processed: bool = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")

    @classmethod
    def of(
        cls,
        params: SamplingParams,
        *,
        biased_token_ids: tuple[int, ...] = (),
        logit_bias: float = 0.0,
        processed: bool = True,
    ) -> LogprobProcessing:
        """The processing of a request sampled with ``params``. Greedy sampling
        (temperature below 1e-5) scores the unfiltered, unscaled distribution, as vLLM does."""
        # vLLM's rules (SamplingParams): below 1e-5 is greedy; below 0.01 is raised to 0.01.
        greedy = params.temperature < 1e-5
        return cls(
            temperature=1.0 if greedy else max(params.temperature, 0.01),
            top_p=1.0 if greedy or params.top_p == 0 else params.top_p,
            top_k=0 if greedy else max(params.top_k, 0),
            biased_token_ids=tuple(biased_token_ids) if logit_bias else (),
            logit_bias=logit_bias if biased_token_ids else 0.0,
            processed=processed,
        )


@dataclass(frozen=True)
class TokenScores:
    """Per-token scores aligned with a sample's token ids.

    ``top_token_ids``/``top_logprobs`` are flattened token-major with stride ``top_k``.
    """

    logprobs: tuple[float, ...] = ()
    entropies: tuple[float, ...] = ()
    top_k: int = 0
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Sample:
    token_ids: tuple[int, ...]
    scores: TokenScores
    finish_reason: FinishReason
    policy_version: int
    stop_string: str = ""
    processing: LogprobProcessing | None = None
    """How the engine computed ``scores.logprobs``; None when the backend does not say."""


# --------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ToolError:
    kind: ToolErrorKind
    message: str


@dataclass(frozen=True)
class ToolResult:
    text: str = ""
    images: tuple[Image, ...] = ()
    error: ToolError | None = None
    latency_ms: float = 0.0


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model sees it: name, description, JSON Schema of its arguments."""

    name: str
    description: str
    parameters_json_schema: str


# --------------------------------------------------------------------------- rewards


@dataclass(frozen=True)
class RewardWeights:
    """How reward parts add up: ``total = accuracy*a + format*f + tool_bonus*t``."""

    accuracy: float = 1.0
    format: float = 0.1
    tool_bonus: float = 0.0


@dataclass(frozen=True)
class ScoreItem:
    """One model output to score against its reference answer."""

    output: str
    gold: str
    kind: AnswerKind
    item_id: str = ""
    choices: tuple[str, ...] = ()
    rel_tol: float | None = None
    abs_tol: float | None = None
    tool_calls: int = 0
    time_limit_s: float | None = None


@dataclass(frozen=True)
class Reward:
    """The verifier's verdict on one output, and why."""

    total: float
    correct: bool
    accuracy: float
    format: float
    tool_bonus: float
    extracted: str | None
    checker: str
    reason: str
    timed_out: bool = False

    @classmethod
    def zero(cls, reason: str, checker: str = "") -> Reward:
        """No reward: the output could not be scored at all (``reason`` says why)."""
        return cls(0.0, False, 0.0, 0.0, 0.0, None, checker, reason)


# --------------------------------------------------------------------------- trajectories


@dataclass(frozen=True)
class Segment:
    """A half-open token span ``[start, end)`` of a trajectory."""

    kind: SegmentKind
    start: int
    end: int
    policy_version: int = 0


@dataclass(frozen=True)
class ToolInvocation:
    call: ToolCall
    result: ToolResult
    segment_index: int


@dataclass(frozen=True)
class Trajectory:
    """One rollout, token-in/token-out. Per-token arrays all have ``len(token_ids)``."""

    trajectory_id: str
    token_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    logprobs: tuple[float, ...]
    entropies: tuple[float, ...]
    segments: tuple[Segment, ...]
    prompt_length: int
    tool_calls: tuple[ToolInvocation, ...] = ()
    image_sha256: tuple[str, ...] = ()
    reward: Reward | None = None
    resampled_from: str = ""
    frozen_prefix_length: int = 0
    truncated: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (lengths, mask, segments)."""
        n = len(self.token_ids)
        for name in ("loss_mask", "logprobs", "entropies"):
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(
                    f"trajectory {self.trajectory_id}: {name} has {got} entries, token_ids has {n}"
                )
        pos = 0
        for i, seg in enumerate(self.segments):
            if seg.start != pos or seg.end < seg.start:
                raise ValueError(
                    f"trajectory {self.trajectory_id}: segment {i} spans "
                    f"[{seg.start}, {seg.end}) but should start at {pos}"
                )
            pos = seg.end
        if self.segments and pos != n:
            raise ValueError(
                f"trajectory {self.trajectory_id}: segments end at {pos}, token_ids has {n}"
            )
        if not 0 <= self.prompt_length <= n:
            raise ValueError(
                f"trajectory {self.trajectory_id}: prompt_length "
                f"{self.prompt_length} outside [0, {n}]"
            )
        if any(self.loss_mask[: self.prompt_length]):
            raise ValueError(f"trajectory {self.trajectory_id}: loss_mask covers prompt tokens")

    @property
    def uses_tools(self) -> bool:
        return bool(self.tool_calls)


@dataclass(frozen=True)
class Group:
    """All rollouts of one question."""

    group_id: str
    question_id: str
    trajectories: tuple[Trajectory, ...]
    images: tuple[Image, ...] = ()
    policy_version: int = 0
    job_id: str = ""
    created_at: float = 0.0
    timings: tuple[tuple[str, float], ...] = ()
    """Seconds the rollout worker spent on the group by phase, as sorted ``(name, s)`` pairs."""
    sampling: LogprobProcessing = LogprobProcessing()
    """How its logprobs were computed (every turn of a group is sampled with the same)."""

    def timing(self, name: str) -> float:
        """Seconds spent in phase ``name`` (0 when not recorded)."""
        return dict(self.timings).get(name, 0.0)
