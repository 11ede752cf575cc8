"""Shared gRPC helpers: :mod:`axpo.rpc.server` starts and stops a service the same way everywhere
(health, reflection, auth, request logging, graceful SIGTERM); :mod:`axpo.rpc.client` opens a
channel with the project's retry policy, default deadline and auth token."""
