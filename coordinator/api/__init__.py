"""HTTP API blueprints, one per resource, all under /v1."""
