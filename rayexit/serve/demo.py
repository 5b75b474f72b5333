"""The end of `make demo`: serve the demo model, send a few requests, print the answers, shut down."""

from __future__ import annotations

from pathlib import Path

from rayexit.serve.run import post_json, start_serving
from rayexit.serve.settings import ServeSettings

DEMO_TEXTS = [
    "show me flights from boston to denver tomorrow morning",
    "what is the cheapest fare from pittsburgh to atlanta",
    "which airlines fly from dallas to san francisco",
    "what does fare code qx mean",
    "how far is the airport from downtown denver",
]


def serve_demo(model_dir: Path, port: int | None = None, *, ray_actor_options: dict | None = None) -> None:
    """Serve `model_dir` on 127.0.0.1 (a free port unless given), classify DEMO_TEXTS, then shut Serve down.

    Uses this process's Ray instance when there is one (and leaves it running), else starts its own.
    """
    settings = ServeSettings.from_args({"model_dir": str(model_dir)})
    print(f"serving {model_dir} ...")
    running = start_serving(settings, port=port, ray_actor_options=ray_actor_options)
    try:
        print(f"Serve is up at {running.url} (OpenAPI docs at {running.url}/docs)")
        status, body = post_json(running.url + "/v1/classify", {"texts": DEMO_TEXTS})
        if status != 200:
            print(f"POST /v1/classify -> {status}: {body}")
            return
        layers = body["layers"]
        print(f"POST /v1/classify ({len(DEMO_TEXTS)} texts, {layers}-layer model):")
        for text, result in zip(DEMO_TEXTS, body["results"], strict=True):
            print(f"  {result['label']:<22} p={result['probability']:.3f} exit {result['exit_layer']}/{layers}  {text}")
        status, body = post_json(running.url + "/v1/classify", {"texts": [""]})
        print(f"POST /v1/classify with an empty text -> {status}: {body['error']['message']}")
    finally:
        running.stop()
        print("Serve shut down")
