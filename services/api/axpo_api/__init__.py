"""The api service: the control plane's HTTP server (FastAPI). :func:`axpo_api.app.create_app`
builds the application; ``axpo serve api`` runs it (:mod:`axpo_api.server`)."""
