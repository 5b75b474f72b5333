"""`rayexit serve` stops cleanly on SIGTERM/SIGINT, and serve_demo() answers and shuts Serve down."""

from __future__ import annotations

import os
import signal
import threading
import urllib.error
import urllib.request

import pytest
from test_serve_validation import confident_tiny_model

from rayexit.cli import build_parser
from rayexit.config import ExitPolicy


class FakeRunning:
    url = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_shuts_down_on_signal(monkeypatch, tmp_path, capsys, sig):
    import rayexit.serve.run as serve_run

    running = FakeRunning()
    seen = {}

    def fake_start(settings, host, port, address):
        seen.update(model_dir=settings.model_dir, host=host, port=port, address=address)
        threading.Timer(0.3, os.kill, (os.getpid(), sig)).start()
        return running

    monkeypatch.setattr(serve_run, "start_serving", fake_start)
    monkeypatch.setattr("ray.is_initialized", lambda: True)  # no real Ray: start_serving is faked
    before = signal.getsignal(sig)
    args = build_parser().parse_args(["serve", str(tmp_path / "model"), "--port", "8123"])
    assert args.func(args) == 0
    assert running.stopped
    assert seen == {"model_dir": str(tmp_path / "model"), "host": "127.0.0.1", "port": 8123, "address": "local"}
    assert signal.getsignal(sig) is before  # handlers put back
    assert "stopped" in capsys.readouterr().out


def test_serve_demo_prints_answers_and_shuts_serve_down(ray_session, tmp_path, minilm_tokenizer, capsys):
    from rayexit.serve.demo import DEMO_TEXTS, serve_demo

    model = confident_tiny_model()
    model.exit_config.policy = ExitPolicy("entropy", 0.15)
    model.save_pretrained(tmp_path / "model", minilm_tokenizer)
    serve_demo(tmp_path / "model", ray_actor_options={"num_cpus": 0})
    out = capsys.readouterr().out
    assert out.count(" exit ") == len(DEMO_TEXTS) and "/4 " in out
    assert "empty text" in out and "Serve shut down" in out
    assert ray_session.is_initialized()  # the session's Ray was borrowed, not stopped
    url = out.split("Serve is up at ")[1].split()[0]
    with pytest.raises(urllib.error.URLError):  # nothing listens there any more
        urllib.request.urlopen(url + "/healthz", timeout=5)
