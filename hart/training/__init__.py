"""Training utilities: the HART objective (and, later, data, caching and loops)."""
