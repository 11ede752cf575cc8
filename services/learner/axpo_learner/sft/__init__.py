"""The supervised fine-tuning stage (``axpo sft``) and the HF export it shares with the learner.

- :mod:`~axpo_learner.sft.format`: the demonstration file (JSON lines, chat style) and its
  rendering, byte-identical to what the rollout loop feeds the model.
- writing such a file (images stored once by hash): :mod:`axpo.study.demo_file` (core).
- :mod:`~axpo_learner.sft.rows`: rendered demonstrations to token ids, loss masks and images.
- :mod:`~axpo_learner.sft.loss`: the loss of a batch, the shared system turn run once.
- :mod:`~axpo_learner.sft.state`: training checkpoints that resume bit-exactly.
- :mod:`~axpo_learner.sft.export`: a complete HF checkpoint from trained weights, atomically.
- :mod:`~axpo_learner.sft.train`: the training run (:func:`~axpo_learner.sft.train.train`).
"""
