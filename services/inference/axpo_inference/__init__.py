"""axpo inference service: vLLM in-process behind the ``axpo.v1.InferenceService`` contract."""
