"""`rayexit serve MODEL_DIR`: serve a model directory in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model directory over HTTP (Ray Serve) until interrupted")
    p.add_argument("model_dir", help="a model directory written by `rayexit train` or `rayexit tune` (best/)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--address", default="local", help="Ray cluster to use: `local` starts one, `auto` joins one")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--target-p99-ms", type=float, help="latency target the adaptive batching steers toward")
    p.add_argument("--relax-under-load", action="store_true", help="relax exit thresholds while p99 is over target")
    p.add_argument("--max-texts", type=int, help="most texts one request may carry")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from rayexit.serve.run import start_serving
    from rayexit.serve.settings import ServeSettings

    options = {
        "model_dir": args.model_dir,
        "device": args.device,
        "target_p99_ms": args.target_p99_ms,
        "relax_under_load": args.relax_under_load or None,
        "max_texts": args.max_texts,
    }
    settings = ServeSettings.from_args({k: v for k, v in options.items() if v is not None})
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        # ray.init puts in its own SIGTERM handler (it exits without shutting Serve down): take the signals
        # back before Serve starts, so a signal at any later point ends in the clean shutdown below.
        for sig in signals:
            signal.signal(sig, on_signal)
        try:
            running = start_serving(settings, host=args.host, port=args.port, address=args.address)
            try:
                print(f"serving {args.model_dir} at {running.url}  (docs: {running.url}/docs); Ctrl-C to stop",
                      flush=True)
                while not stop.wait(0.5):
                    pass
                print("shutting down Serve ...", flush=True)
            finally:
                running.stop()
        finally:
            if started_ray:
                ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0
