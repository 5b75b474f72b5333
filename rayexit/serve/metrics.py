"""The replica's Prometheus metrics, through Ray's metrics API (scraped from Ray's metrics endpoint)."""

from __future__ import annotations

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics:
    def __init__(self, num_layers: int) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.exit_layer = Histogram(
            "rayexit_exit_layer",
            description="Layer at which each text left the network (1-based).",
            boundaries=[layer + 0.5 for layer in range(1, num_layers)],
        )
        self.batch_size = Histogram(
            "rayexit_batch_size", description="Texts per batch taken from the queue.", boundaries=BATCH_SIZES
        )
        self.queue_wait = Histogram(
            "rayexit_queue_wait_ms", description="Time a text waited in the batch queue.", boundaries=LATENCY_MS
        )
        self.latency = Histogram(
            "rayexit_request_latency_ms",
            description="Replica time per request, from body read to answer.",
            boundaries=LATENCY_MS,
            tag_keys=("route",),
        )
        self.padding = Histogram(
            "rayexit_padding_fraction",
            description="Share of computed tokens that were padding, per batch.",
            boundaries=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75],
        )
        self.rejected = Counter(
            "rayexit_rejected_requests", description="Requests answered 4xx.", tag_keys=("status", "field")
        )
        self.max_batch_size = Gauge("rayexit_max_batch_size", description="Batch size the controller allows now.")
        self.batch_wait = Gauge("rayexit_batch_wait_ms", description="Batch wait timeout the controller set.")
        self.relax_level = Gauge("rayexit_relax_level", description="How many steps the exit thresholds are relaxed.")
