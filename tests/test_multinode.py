"""The two-node cluster script (tests/multinode/two_node.py), opt-in: RAYEXIT_MULTINODE=1.

It starts its own two Ray nodes (network namespaces, or two raylets on loopback), submits a
training job, kills the worker node mid-run and brings it back; minutes, and root for namespaces.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "multinode" / "two_node.py"

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(os.environ.get("RAYEXIT_MULTINODE") != "1", reason="set RAYEXIT_MULTINODE=1 to run"),
]


def test_two_node_job_survives_losing_its_worker_node():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=660)
    print(out.stdout[-6000:])
    assert "MODE: " in out.stdout
    assert "different nodes" in out.stdout
    assert "RESULT: " in out.stdout and "damaged: none" in out.stdout
    assert out.returncode == 0, out.stderr[-3000:]
