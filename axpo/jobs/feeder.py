"""Questions onto a job's prompts stream (:class:`PromptFeeder`): what ``axpo run``'s launcher
and a deployment's learner do while a job trains."""

from __future__ import annotations

from axpo.queue import PromptTask, TrajectoryQueue
from axpo.settings.job import JobSpec
from axpo.study.tasks import task_data


class PromptFeeder:
    """Keeps ``backlog`` questions of ``spec.tasks`` waiting for the rollout workers.

    The next question's index is the queue's ``prompts_produced`` counter (kept in Redis), so
    a feeder made again for the same queue (a restarted learner) continues where the last one
    stopped instead of asking the same questions again. Question ``i`` is task ``i`` of the
    spec's tasks (``task_id`` ``q<i>``, ``question_id`` ``q<i mod count>``).
    """

    def __init__(self, queue: TrajectoryQueue, spec: JobSpec, backlog: int | None = None) -> None:
        self.queue = queue
        self.spec = spec
        self.backlog = backlog or spec.run.max_prompt_backlog or 2 * spec.questions_per_step
        if self.backlog < 1:
            raise ValueError(f"backlog {self.backlog}: must be >= 1")

    def top_up(self) -> int:
        """Put questions until ``backlog`` are outstanding (produced, not yet done or
        dead-lettered); returns how many were put."""
        c = self.queue.counters()
        outstanding = c.prompts_produced - c.prompts_done - c.prompts_dead_lettered
        missing = self.backlog - outstanding
        if missing <= 0:
            return 0
        start = c.prompts_produced
        count = self.spec.tasks.count
        self.queue.put_prompts(
            [
                PromptTask(
                    task_id=f"q{i}",
                    question_id=f"q{i % count}",
                    data=task_data(self.spec.tasks, i),
                )
                for i in range(start, start + missing)
            ]
        )
        return missing
