"""The learner's main loop: take groups, train, checkpoint, acknowledge, publish.

:class:`LearnerLoop` (``learner_loop.py``) runs the steps; ``collect.py`` takes a step's groups
from the queue, ``bad_groups.py`` finds the groups the trainer cannot batch,
``publication.py`` decides when and at which version weights are published,
``redis_retry.py`` rides out Redis outages, ``status.py`` is what ``Status`` reports. The whole
story (one step in order, exactly-once, crash recovery, torchrun): services/learner/README.md.
"""

from axpo_learner.loop.learner_loop import LearnerLoop
from axpo_learner.loop.publication import restart_version
from axpo_learner.loop.status import LoopStatus, describe

__all__ = ["LearnerLoop", "LoopStatus", "describe", "restart_version"]
