"""The job store: training jobs of a deployment in Redis, shared by the api service, the
learner, the rollout workers and ``axpo run`` (:class:`JobStore`).

Keys (``P`` = the key prefix, ``axpo`` by default; ``J`` = a job id)::

    P:jobs:job:J              hash    the record (:class:`JobRecord` fields, spec as JSON,
                                      the last step record as JSON, ``seq``, ``spec_digest``)
    P:jobs:job:J:events       stream  events (:data:`EVENT_TYPES`): ``type`` and ``data`` (JSON)
    P:jobs:job:J:metrics      zset    step records as JSON, scored by step
    P:jobs:job:J:checkpoints  list    checkpoints as JSON (``step``, ``path``, ``time``)
    P:jobs:all                zset    every job id, scored by submission order (``seq``)
    P:jobs:state:<state>      zset    the ids in each state, same scores
    P:jobs:queue              list    ids waiting to run, oldest first
    P:jobs:running            string  the id of the job this deployment runs (claimed)
    P:jobs:seq                string  submission counter
    P:jobs:idempotency:<h>    string  job id of an idempotency key (``h``: sha256 of scope and
                                      key), expiring after ``idempotency_ttl_s``

**Contract.**

- States move ``queued -> running -> succeeded | failed | cancelled``; a queued job may be
  cancelled or fail. Every change is one Lua script that checks the current state, updates the
  record and both indexes, and appends a ``state`` event: an index never disagrees with a record,
  and a watcher of the events sees every change once, in order.
- One running job per deployment: :meth:`JobStore.claim_next` returns the claimed job while it
  is not finished (so a restarted learner resumes it), else pops the oldest queued job into the
  slot; finishing a job frees the slot.
- Event ids are the stream's ids (``ms-seq``, increasing): reading after the last id seen
  (``XREAD``, exclusive) resumes with no gap and no repeat; SSE's ``Last-Event-ID`` is that id.
- A running job is cancelled by a flag (:meth:`JobStore.cancel_requested`) its workers poll;
  they stop, checkpoint and call ``finish(cancelled)``. A queued job is cancelled at once.
- Step records are stored as ``metrics.jsonl`` holds them (NaN as null); a step recorded twice
  (a learner resumed from a checkpoint trains it again) keeps the last record.

Records are never expired: a job's keys stay until deleted by hand (they are small: one
record per step).
"""

from axpo.jobs.records import (
    EVENT_TYPES,
    IdempotencyConflictError,
    JobEvent,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStateError,
)
from axpo.jobs.store import JobStore, new_job_id

__all__ = [
    "EVENT_TYPES",
    "IdempotencyConflictError",
    "JobEvent",
    "JobNotFoundError",
    "JobRecord",
    "JobState",
    "JobStateError",
    "JobStore",
    "new_job_id",
]
