"""The replica's Prometheus metrics, through Ray's metrics API (scraped from Ray's metrics endpoint).

Names are declared here as `rayexit_*`; Ray's exporter prefixes every application metric with
`ray_`, so Prometheus and Grafana see `ray_rayexit_*` (e.g. `ray_rayexit_request_latency_ms`).
Times are in milliseconds, as in Serve's own `ray_serve_*_latency_ms` metrics, so the two can
share a dashboard panel. Label values come only from fixed sets (route names, HTTP statuses,
validation.REASONS): nothing a client sends can create a new time series.
"""

from __future__ import annotations

from typing import Any

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics:
    def __init__(self, num_layers: int, metrics: Any = None) -> None:
        """`metrics`: the module with Counter, Gauge and Histogram (default ray.util.metrics; tests pass a fake)."""
        if metrics is None:
            from ray.util import metrics
        Counter, Gauge, Histogram = metrics.Counter, metrics.Gauge, metrics.Histogram

        self.exit_layer = Histogram(
            "rayexit_exit_layer",
            description="Layer at which each text left the network (1-based).",
            boundaries=[layer + 0.5 for layer in range(1, num_layers)],
        )
        self.batch_size = Histogram(
            "rayexit_batch_size", description="Texts per batch taken from the queue.", boundaries=BATCH_SIZES
        )
        self.queue_wait = Histogram(
            "rayexit_queue_wait_ms", description="Time a text waited in the batch queue, in ms.",
            boundaries=LATENCY_MS,
        )
        self.latency = Histogram(
            "rayexit_request_latency_ms",
            description="Replica time per answered request, from validated body to answer, in ms.",
            boundaries=LATENCY_MS,
            tag_keys=("route",),
        )
        self.padding = Histogram(
            "rayexit_padding_fraction",
            description="Share of computed tokens that were padding, per batch.",
            boundaries=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75],
        )
        self.layer_rows = Histogram(
            "rayexit_layer_rows",
            description="Rows (texts) computed by each execution of one encoder layer; rebatching makes them fuller.",
            boundaries=BATCH_SIZES,
        )
        self.rejected = Counter(
            "rayexit_rejected_requests",
            description="Requests refused: 4xx for bad input, 503 when shed under load (reason: a fixed set).",
            tag_keys=("status", "reason"),
        )
        self.failed = Counter(
            "rayexit_failed_requests",
            description="Requests answered 500: the model failed on one of their texts, or an internal error.",
            tag_keys=("reason",),
        )
        self.max_batch_size = Gauge("rayexit_max_batch_size", description="Batch size the controller allows now.")
        self.batch_wait = Gauge("rayexit_batch_wait_ms", description="Batch wait timeout the controller set, in ms.")
        self.relax_level = Gauge("rayexit_relax_level", description="How many steps the exit thresholds are relaxed.")
        # The accuracy guard (set only when it runs); `layer` takes the model's exit numbers, a fixed set.
        self.guard_agreement = Gauge(
            "rayexit_guard_agreement",
            description="Accuracy guard: share of checked early answers that match full depth, at current thresholds.",
        )
        self.guard_layer_agreement = Gauge(
            "rayexit_guard_layer_agreement", description="Accuracy guard: agreement with full depth per exit.",
            tag_keys=("layer",),
        )
        self.guard_threshold = Gauge(
            "rayexit_guard_threshold", description="Accuracy guard: the exit threshold served now, per exit.",
            tag_keys=("layer",),
        )
        self.guard_samples = Gauge("rayexit_guard_samples", description="Accuracy guard: rows checked at full depth.")
        self.queued_texts = Gauge(
            "rayexit_queued_texts", description="Texts admitted and not yet taken by a batch (the backlog)."
        )
