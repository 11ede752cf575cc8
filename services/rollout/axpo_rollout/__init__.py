"""axpo rollout workers: the agent loop (``agent``), its gRPC clients (``clients``), the worker
that turns queued questions into scored groups (``worker``) and its process entry (``server``)."""
