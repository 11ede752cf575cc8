"""A rollout under construction (:class:`RolloutState`), what its service calls took
(:class:`Timings`), and the finished :class:`~axpo.contracts.domain.Trajectory` made from it
(:func:`to_trajectory`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from axpo.contracts.domain import (
    Image,
    Reward,
    Segment,
    SegmentKind,
    ToolInvocation,
    Trajectory,
)
from axpo_rollout.agent.vocab import Vocab


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


def to_trajectory(tid: str, state: RolloutState, reward: Reward) -> Trajectory:
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
