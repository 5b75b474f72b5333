"""`rayexit serve MODEL_DIR`: serve a model directory in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model directory over HTTP (Ray Serve) until interrupted")
    p.add_argument("model_dir", help="a model directory written by `rayexit train` or `rayexit tune` (best/)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; on a cluster already running Serve, its port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--address", default="local",
                   help="Ray cluster: `local` starts one (loopback only), `auto` joins this machine's, or host:port")
    p.add_argument("--app-name", help="Serve application name (default: from the model directory's folder name)")
    p.add_argument("--route-prefix", help="URL prefix of this model (default: /APP-NAME)")
    p.add_argument("--metrics-export-port", type=int,
                   help="port of Ray's Prometheus endpoint when this command starts Ray (default: a free one)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--target-p99-ms", type=float, help="latency target the adaptive batching steers toward")
    p.add_argument("--relax-under-load", action="store_true", help="relax exit thresholds while p99 is over target")
    p.add_argument("--max-texts", type=int, help="most texts one request may carry")
    p.add_argument("--guard-target", type=float,
                   help="accuracy guard: keep early answers agreeing with full depth at least this often (e.g. 0.99)")
    p.add_argument("--guard-sample", type=float, help="accuracy guard: share of served texts checked at full depth "
                   "(default 0.05)")
    p.add_argument("--guard-allow-past-tuned", action="store_true",
                   help="accuracy guard: may relax thresholds past the tuned values when agreement allows")
    p.add_argument("--rebatch", action="store_true",
                   help="layer-level rebatching: texts that survive a layer in different batches share the next")
    p.set_defaults(func=run)


class Interrupted(BaseException):
    """SIGINT/SIGTERM during start-up. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    on the way (Ray's or ours) swallows it before everything started so far is stopped again."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """During start-up a signal interrupts it (outside `shielded()` at once, inside at its end); once serving
    it asks for a clean stop; while stopping, further signals are ignored so the drain can finish."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.serving = False
        self.received: int | None = None
        self._shielded = False

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        first = self.received is None
        if first:
            self.received = signum
        self.stop.set()
        if first and not self.serving and not self._shielded:
            raise Interrupted(signum)  # once: a second signal must not cut short the clean-up of the first

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Starting Ray's processes must not be cut in half (half-started agents outlive us): hold the signal."""
        import ray._private.utils as ray_utils

        # ray.init installs a SIGTERM handler that exits at once (status 15, no message, agents left running);
        # keep ours in place while it runs.
        original = ray_utils.set_sigterm_handler
        ray_utils.set_sigterm_handler = lambda handler: None
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = False
            ray_utils.set_sigterm_handler = original
        if self.received is not None and not self.serving:
            raise Interrupted(self.received)


def run(args: argparse.Namespace) -> int:
    from rayexit.cluster import connect, wants_local
    from rayexit.serve.run import (
        DEFAULT_PORT,
        check_app_name,
        check_port,
        check_port_number,
        check_route_prefix,
        default_app_name,
        start_serving,
    )
    from rayexit.serve.settings import ServeSettings

    options = {
        "model_dir": args.model_dir,
        "device": args.device,
        "target_p99_ms": args.target_p99_ms,
        "relax_under_load": args.relax_under_load or None,
        "max_texts": args.max_texts,
        "guard_target": args.guard_target,
        "guard_sample": args.guard_sample,
        "guard_allow_past_tuned": args.guard_allow_past_tuned or None,
        "rebatch": args.rebatch or None,
    }
    settings = ServeSettings.from_args({k: v for k, v in options.items() if v is not None}).resolved()
    app_name = check_app_name(args.app_name or default_app_name(settings.model_dir))
    route_prefix = check_route_prefix(args.route_prefix or f"/{app_name}")
    if args.port is not None:
        check_port_number(args.port)
    if args.metrics_export_port is not None:
        check_port_number(args.metrics_export_port)
    if wants_local(args.address):
        check_port(args.host, args.port or DEFAULT_PORT)  # a new instance has no proxy yet: refuse before Ray starts

    if not faulthandler.is_enabled():  # connect() turns Ray's C++ crash handler off in this process (cluster.py)
        with contextlib.suppress(ValueError, OSError):  # a stderr without a file descriptor
            faulthandler.enable()
    signals = Signals()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    signals.install()
    running = None
    cluster = None
    try:
        print(f"starting: application {app_name} at route {route_prefix} ...", flush=True)
        with signals.shielded():
            # The driver's core worker would install a C++ handler that aborts on SIGTERM (Serve left
            # running): connect() keeps it off in this process and puts our handlers back afterwards.
            cluster = connect(args.address, metrics_export_port=args.metrics_export_port, keep_signal_handlers=True)
        if args.metrics_export_port is not None and not cluster.started:
            print(f"note: --metrics-export-port applies only to a Ray instance this command starts; "
                  f"this cluster's node exports on port {cluster.metrics_export_port}", flush=True)
        running = start_serving(
            settings,
            host=args.host,
            port=args.port,
            app_name=app_name,
            route_prefix=route_prefix,
            default_port=DEFAULT_PORT,
            cluster=cluster,
        )
        signals.serving = True
        if signals.received is not None:
            raise Interrupted(signals.received)
        print(f"serving {args.model_dir} as application {app_name} at {running.url}  "
              f"(docs: {running.url}/docs); Ctrl-C to stop", flush=True)
        if cluster.metrics_url:
            print(f"metrics (Prometheus) for this node: {cluster.metrics_url}", flush=True)
        while not signals.stop.wait(0.5):
            pass
        print(f"stopping: draining requests in flight, then deleting application {app_name} ...", flush=True)
        running.stop()
        print("stopped", flush=True)
        return 0
    except Interrupted as exc:
        signals.serving = True  # from here on, signals only wait for the clean-up
        if running is not None:
            running.stop()
        elif cluster is not None:
            cluster.shutdown()
        print(f"stopped by {exc} before serving; everything this command started has been stopped", file=sys.stderr,
              flush=True)
        return 128 + exc.signum
    except BaseException:
        if running is None and cluster is not None:
            cluster.shutdown()  # start_serving stops what it started; the instance connect() started is ours
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
