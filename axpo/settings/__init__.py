"""Configuration, one module per service next to a small shared base.

Settings read environment variables (prefix ``AXPO_<SERVICE>_``, nested fields joined with
``__``), e.g. ``AXPO_VERIFIER_RPC__PORT=50053``. Every field carries a docstring; a unit test
fails if one does not. Job specs are YAML files validated by :class:`axpo.settings.job.JobSpec`;
errors name the file and the dotted path of the field (``algorithm.rho: ...``).

- :mod:`~axpo.settings.base`: gRPC server/client, logging, shared config helpers.
- :mod:`~axpo.settings.verifier`, :mod:`~axpo.settings.inference`, :mod:`~axpo.settings.tools`,
  :mod:`~axpo.settings.learner`, :mod:`~axpo.settings.rollout`: one per service.
- :mod:`~axpo.settings.queue`: the trajectory queue (used by the learner and rollout workers).
- :mod:`~axpo.settings.job`: the YAML job spec.
"""
