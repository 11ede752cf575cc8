"""What a running process tells people: structured logs (:mod:`~axpo.telemetry.logs`) and
per-step metrics as Prometheus gauges and JSON lines (:mod:`~axpo.telemetry.metrics`)."""
