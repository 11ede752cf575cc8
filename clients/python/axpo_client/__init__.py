"""Python client of the axpo control plane (the api service): submit training jobs, watch
them live, cancel them. Depends on httpx and pydantic only.

>>> from axpo_client import Client                     # doctest: +SKIP
>>> c = Client()                                       # AXPO_API_URL, AXPO_API_TOKEN
>>> job = c.submit("configs/tiny-cpu-axpo.yaml")
>>> c.wait(job.id).state
<JobState.SUCCEEDED: 'succeeded'>
"""

from axpo_client.client import AsyncClient, Client, RetryPolicy, load_spec
from axpo_client.errors import ApiError, AuthError, Conflict, NotFound, ValidationError
from axpo_client.models import (
    Checkpoint,
    CheckpointList,
    Event,
    EventType,
    FieldError,
    Health,
    Job,
    JobList,
    JobState,
    MetricsPage,
    Problem,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuthError",
    "Checkpoint",
    "CheckpointList",
    "Client",
    "Conflict",
    "Event",
    "EventType",
    "FieldError",
    "Health",
    "Job",
    "JobList",
    "JobState",
    "MetricsPage",
    "NotFound",
    "Problem",
    "RetryPolicy",
    "ValidationError",
    "load_spec",
]
