"""Task families, one module each: ``generate(seed, image_size) -> Task`` (see
:mod:`axpo.study.tasks`)."""
