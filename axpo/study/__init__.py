"""The study kit: what it takes to train and measure without a model hub or a GPU.

- :mod:`~axpo.study.tasks`: procedurally generated questions where a tool helps (seeded).
- :mod:`~axpo.study.tiny_model`: a tiny random-init Qwen3-VL checkpoint, built offline.
- :mod:`~axpo.study.report`: a run's ``report.md`` and plots from its ``metrics.jsonl``.
"""
