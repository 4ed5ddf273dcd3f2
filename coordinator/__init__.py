"""Coordinator service (registry, levels, rounds, aggregation over HTTP). Not built yet."""
