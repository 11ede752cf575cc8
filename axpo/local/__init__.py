"""The local runner: ``axpo run CONFIG`` starts Redis, every service and the rollout workers as
processes on this machine, shows progress, and writes the report
(:mod:`~axpo.local.launcher`)."""
