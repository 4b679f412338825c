"""User-facing symbolic definitions: residual systems, fixed points, problems."""
