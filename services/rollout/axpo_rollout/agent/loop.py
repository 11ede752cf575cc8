"""The group sampler: :class:`AgentLoop` (GRPO, plus AXPO's resampling).

**A group** (:meth:`AgentLoop.run_group`). One ``n=G`` Generate for the first turn, then every
rollout continues on its own thread (generations of many rollouts and questions batch in
vLLM; tool calls overlap with other rollouts' generations). Then one batched Score. With
``algorithm.name == "axpo"``, the resamples (``axpo_rollout.agent.resampling``) join the
group.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from axpo.contracts.domain import Group, LogprobProcessing, SegmentKind
from axpo.study.tasks import Task
from axpo_rollout.agent.resampling import AxpoResampling, Speculation
from axpo_rollout.agent.state import Timings, to_trajectory


class AgentLoop(AxpoResampling):
    """Samples groups for one job; thread-safe (one instance serves a whole worker).

    The pieces: one rollout's turns (:class:`~axpo_rollout.agent.rollout.RolloutRunner`),
    AXPO's resamples (:class:`~axpo_rollout.agent.resampling.AxpoResampling`)."""

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
        params = self.sampling(alg.group_size, self._budget(base))
        first = self.backend.generate(base.tokens, base.images, params)
        # Every turn of the group samples with the job's parameters on the same engine, so the
        # first turn's processing is the group's; a backend that does not report it gets the
        # request's own (no logit bias).
        reported = next((s.processing for s in first if s.processing is not None), None)
        sampling = reported or LogprobProcessing.of(params)
        timings.add("generate_s", time.perf_counter() - t0)
        states, callers = self._first_turns(base, first)
        speculative: dict[tuple[int, int, int], Speculation] = {}
        if alg.name == "axpo" and alg.speculative_resampling and alg.tool_call_anchor == "first":
            speculative = self._speculate(group_id, states, callers)
        futures = [self.pool.submit(self.continue_rollout, s, timings) for s in states]
        try:
            rewards = self._score_originals(futures, callers, task, timings, speculative)
        except BaseException:
            self._cancel(speculative.values())
            raise
        trajectories = [
            to_trajectory(f"{group_id}-{i}", f.result(), r)
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
            sampling=sampling,
        )
