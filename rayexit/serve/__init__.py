"""Ray Serve deployment of a multi-exit model: FastAPI ingress, batched early exit, adaptive batching."""
