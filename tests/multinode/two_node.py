"""A real two-node Ray cluster on one machine: `ray job submit` training, a node killed mid-run.

Run as root from the repository root (namespaces need root; without them it falls back):

    .venv/bin/python tests/multinode/two_node.py

Set-up, preferred: two network namespaces joined by a veth pair (iproute2),

    ip netns add rxh-<id>; ip netns add rxw-<id>
    ip link add rxh<id> type veth peer name rxw<id>   # one end into each namespace
    head 10.213.<x>.1/24 in rxh-<id>, worker 10.213.<x>.2/24 in rxw-<id>, `lo` up in both

and `ray start --head` in one, `ray start --address=<head>:<port>` in the other, so each node
has its own address and all cluster traffic crosses the veth link. Where namespaces cannot be
made, two raylets start on 127.0.0.1 with their own ports and temp dirs. The script says which.

Then: submit `jobs/train.py` with two workers of 1 CPU each (each node has 1 CPU, so one worker
per node), check from the job log that the two ranks ran on different nodes, SIGKILL every
process of the worker node after the first checkpoint, bring the node back, and wait for the
job to finish (recovered from the checkpoint) or fail with a clear message. Every checkpoint
written is then verified (sha256 digests). It stops by itself (--timeout), and cleans up only
what it started: processes by PID (those inside its namespaces, or those whose command line
names its own temp dirs, and their children), its namespaces and its temp folders. Never
`ray stop`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXIT_RECOVERED, EXIT_FAILED_CLEARLY, EXIT_BAD = 0, 0, 1


def say(message: str) -> None:
    print(f"[two-node {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes, found through /proc (no psutil) ------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (ppid, cmdline)
    return table


def with_descendants(roots: set[int]) -> set[int]:
    table = _proc_table()
    found = set(roots) & set(table)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def kill_pids(pids: set[int], what: str) -> None:
    pids.discard(os.getpid())
    for pid in sorted(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    say(f"killed {len(pids)} process(es) of {what}: {sorted(pids)[:12]}{' ...' if len(pids) > 12 else ''}")


# -- the two ways to get two nodes -------------------------------------------------------------


class Nodes:
    """Where the head and the worker live and how to run a command on each."""

    mode = ""
    head_ip = worker_ip = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ports = {name: free_port() for name in ("gcs", "dashboard", "client")}

    def prefix(self, node: str) -> list[str]:
        return []

    def node_pids(self, node: str) -> set[int]:
        raise NotImplementedError

    def teardown(self) -> None:
        pass

    def node_ports(self, node: str) -> list[str]:
        return []

    def interface(self, node: str) -> str:
        """The interface gloo must use: by default it binds to the host name's address."""
        return "lo"


class NamespaceNodes(Nodes):
    mode = "network namespaces"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        tag = f"{os.getpid() % 100000}"
        self.ns = {"head": f"rxh-{tag}", "worker": f"rxw-{tag}"}
        self.veth = (f"rxh{tag}", f"rxw{tag}")
        subnet = 16 + os.getpid() % 200
        self.head_ip, self.worker_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.made: list[str] = []
        try:
            for node in ("head", "worker"):
                _ip("netns", "add", self.ns[node])
                self.made.append(self.ns[node])
            _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
            for end, node, ip in ((self.veth[0], "head", self.head_ip), (self.veth[1], "worker", self.worker_ip)):
                _ip("link", "set", end, "netns", self.ns[node])
                _ip("-n", self.ns[node], "addr", "add", f"{ip}/24", "dev", end)
                _ip("-n", self.ns[node], "link", "set", end, "up")
                _ip("-n", self.ns[node], "link", "set", "lo", "up")
            out = subprocess.run(self.prefix("worker") + ["ping", "-c", "1", "-W", "2", self.head_ip],
                                 capture_output=True, text=True)
            if out.returncode != 0 and shutil.which("ping"):
                raise RuntimeError(f"no route between the namespaces: {out.stdout.strip()} {out.stderr.strip()}")
        except BaseException:
            self.teardown()
            raise

    def prefix(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[node]]

    def interface(self, node: str) -> str:
        return self.veth[0] if node == "head" else self.veth[1]

    def node_pids(self, node: str) -> set[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def teardown(self) -> None:
        for name in self.made:
            pids = self.node_pids("head" if name == self.ns["head"] else "worker")
            if pids:
                kill_pids(pids, f"namespace {name}")
        time.sleep(1)
        for name in self.made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)  # the veth goes with it
        self.made = []


class LoopbackNodes(Nodes):
    mode = "loopback (two raylets on 127.0.0.1)"
    head_ip = worker_ip = "127.0.0.1"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.extra = {node: {k: free_port() for k in ("nm", "om", "agent", "grpc", "metrics", "renv")}
                      for node in ("head", "worker")}

    def node_ports(self, node: str) -> list[str]:
        ports = self.extra[node]
        low = 20000 + (os.getpid() % 200) * 100 + (0 if node == "head" else 50)
        return [
            f"--node-manager-port={ports['nm']}", f"--object-manager-port={ports['om']}",
            f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['grpc']}",
            f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['renv']}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 49}",
        ]

    def node_pids(self, node: str) -> set[int]:
        marker = str(self.work / node)
        return with_descendants({pid for pid, (_, cmd) in _proc_table().items() if marker in cmd})

    def teardown(self) -> None:
        for node in ("worker", "head"):
            pids = self.node_pids(node)
            if pids:
                kill_pids(pids, f"the {node} node")


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


# -- the cluster -------------------------------------------------------------------------------


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Ray 2.60 turns token auth on for a head when a local token exists, but not for a joining
    # node; say it for every process so both nodes and the job client use Ray's own local token.
    e.setdefault("RAY_AUTH_MODE", "token")
    e.pop("RAY_ADDRESS", None)
    return e


def run(cmd: list[str], timeout: float = 120, check: bool = True, extra_env: dict | None = None):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env(), **(extra_env or {})})
    if check and out.returncode != 0:
        tail = f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({out.returncode}):\n{tail}")
    return out


def start_node(nodes: Nodes, node: str) -> None:
    temp = nodes.work / node
    temp.mkdir(exist_ok=True)
    common = [str(BIN / "ray"), "start", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"]
    if node == "head":
        cmd = common + [
            "--head", f"--node-ip-address={nodes.head_ip}", f"--port={nodes.ports['gcs']}",
            "--include-dashboard=true", f"--dashboard-host={nodes.head_ip}",
            f"--dashboard-port={nodes.ports['dashboard']}", f"--ray-client-server-port={nodes.ports['client']}",
        ]
    else:
        cmd = common + [f"--address={nodes.head_ip}:{nodes.ports['gcs']}", f"--node-ip-address={nodes.worker_ip}"]
    # Ray's workers inherit the raylet's environment: this keeps torch.distributed (gloo) on
    # the node's own link instead of the address the machine's host name resolves to.
    run(nodes.prefix(node) + cmd + nodes.node_ports(node), timeout=180,
        extra_env={"GLOO_SOCKET_IFNAME": nodes.interface(node)})
    say(f"started the {node} node ({nodes.head_ip if node == 'head' else nodes.worker_ip})")


def alive_nodes(nodes: Nodes) -> int:
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    out = run(nodes.prefix("head") + [str(BIN / "python"), "-c", code, f"{nodes.head_ip}:{nodes.ports['gcs']}"],
              check=False, timeout=90)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def wait_for(predicate, what: str, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")


def job_cmd(nodes: Nodes, sub: str, *args: str) -> list[str]:
    address = f"http://{nodes.head_ip}:{nodes.ports['dashboard']}"
    return nodes.prefix("head") + [str(BIN / "ray"), "job", sub, "--address", address, *args]


def job_logs(nodes: Nodes, job: str) -> str:
    return run(job_cmd(nodes, "logs", job), check=False, timeout=60).stdout


def job_status(nodes: Nodes, job: str) -> str:
    done = run(job_cmd(nodes, "status", job), check=False, timeout=60)
    out = done.stdout + done.stderr  # the CLI prints the status through its logger
    for status in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if status in out:
            return status
    # `ray job status` gave nothing readable in the one real run: judge by the job's own log
    logs = job_logs(nodes, job)
    if "checkpoints and TensorBoard logs:" in logs:  # rayexit train's last line
        return "SUCCEEDED"
    if "error: " in logs:
        return "FAILED"
    return "UNKNOWN"


# -- the training job --------------------------------------------------------------------------


def make_inputs(work: Path) -> tuple[Path, Path]:
    """A small random BERT (no download) with the packaged tokenizer, and a synthetic TSV."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoModel, BertConfig

    from rayexit.models import load_tokenizer

    model_dir = work / "tiny-bert"
    config = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=130)
    AutoModel.from_config(config).save_pretrained(model_dir)
    load_tokenizer("minilm").save_pretrained(model_dir)
    rng = random.Random(0)
    words = "good bad fine awful great terrible nice poor film plot actors story".split()
    data = work / "train.tsv"
    with open(data, "w") as handle:
        handle.write("sentence\tlabel\n")
        for _ in range(1600):
            text = [rng.choice(words) for _ in range(rng.randint(4, 20))]
            label = int(sum(w in ("good", "fine", "great", "nice") for w in text) > len(text) / 4)
            handle.write(f"{' '.join(text)}\t{label}\n")
    return model_dir, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=540, help="stop everything after this many seconds")
    parser.add_argument("--loopback", action="store_true", help="skip namespaces, use two raylets on 127.0.0.1")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rxmn-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    nodes: Nodes | None = None

    def on_alarm(signum, frame):
        raise TimeoutError(f"the script's own limit of {args.timeout:.0f}s was reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.timeout))
    outcome = EXIT_BAD
    job = ""
    try:
        if not args.loopback:
            try:
                nodes = NamespaceNodes(work)
            except Exception as exc:  # no root, no iproute2, no netns support in this container ...
                say(f"network namespaces unavailable ({exc}); falling back to loopback")
        nodes = nodes or LoopbackNodes(work)
        say(f"MODE: {nodes.mode}; head {nodes.head_ip}, worker {nodes.worker_ip}")
        model_dir, data = make_inputs(work)
        start_node(nodes, "head")
        start_node(nodes, "worker")
        wait_for(lambda: alive_nodes(nodes) == 2, "two alive nodes", 120)
        say("cluster up: 2 nodes, 1 CPU each")

        storage, output = work / "storage", work / "model"
        submit = job_cmd(nodes, "submit", "--no-wait", "--working-dir", str(REPO), "--") + [
            "python", "jobs/train.py", "--model", str(model_dir), "--train", str(data), "--method", "romebert",
            "--epochs", str(args.epochs), "--batch-size", "8", "--max-length", "32", "--lr", "1e-3",
            "--num-workers", "2", "--max-failures", "3", "--storage-path", str(storage), "--name", "two-node",
            "--output", str(output),
        ]
        out = run(submit, timeout=180)
        job = next(word for line in out.stdout.splitlines() for word in line.split("'") if word.startswith("raysubmit"))
        say(f"submitted job {job}")

        def workers_seen():
            seen = {}
            logs = job_logs(nodes, job)
            if "rayexit-worker rank=" not in logs and job_status(nodes, job) in ("FAILED", "STOPPED"):
                raise RuntimeError("the job ended before its workers started")
            for line in logs.splitlines():
                if "rayexit-worker rank=" in line:
                    part = line.split("rayexit-worker ", 1)[1].split()
                    fields = dict(p.split("=", 1) for p in part if "=" in p)
                    seen[fields["rank"]] = fields["node"]
            return seen if len(seen) == 2 else None

        seen = wait_for(workers_seen, "both workers to start", 240)
        different = len(set(seen.values())) == 2
        say(f"workers: rank 0 on node {seen['0'][:12]}, rank 1 on node {seen['1'][:12]} -> "
            f"{'different nodes' if different else 'THE SAME NODE'}")
        wait_for(lambda: "rayexit-checkpoint" in job_logs(nodes, job), "the first checkpoint", 240, every=1)
        say("first checkpoint reported; killing the worker node's Ray processes")
        kill_pids(nodes.node_pids("worker"), "the worker node")
        time.sleep(15)
        say("bringing the worker node back")
        start_node(nodes, "worker")
        status = wait_for(lambda: (s := job_status(nodes, job)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                          "the job to finish", max(60, args.timeout - (time.monotonic() - started) - 60), every=5)
        logs = job_logs(nodes, job)
        resumed = "resumes at stage" in logs or logs.count("rayexit-worker rank=0") > 1
        say(f"job {status}; restarted worker group: {resumed}")
        print("---- job log (last lines) ----")
        print("\n".join(line for line in logs.splitlines()[-25:] if "PlacementGroupCleaner" not in line))
        print("------------------------------")
        bad = verify_checkpoints(storage / "two-node")
        if status == "SUCCEEDED":
            ok = different and resumed and not bad and (output / "model.safetensors").is_file()
            say(f"RESULT: recovered after the node returned; model at {output.name}/; "
                f"checkpoints intact: {not bad}; {'PASS' if ok else 'FAIL'}")
            outcome = EXIT_RECOVERED if ok else EXIT_BAD
        else:
            clear = "error:" in logs or "failed" in logs.lower()
            say(f"RESULT: the job failed ({'with a message' if clear else 'WITHOUT a clear message'}); "
                f"checkpoints intact: {not bad}")
            outcome = EXIT_FAILED_CLEARLY if (clear and not bad and different) else EXIT_BAD
    except Exception as exc:
        say(f"ERROR: {type(exc).__name__}: {exc}")
        if job and nodes is not None:
            say(f"job {job}: {job_status(nodes, job)}; its log ends:")
            print("\n".join(job_logs(nodes, job).splitlines()[-40:]))
        outcome = EXIT_BAD
    finally:
        signal.alarm(0)
        if nodes is not None:
            nodes.teardown()
        shutil.rmtree(work, ignore_errors=True)
        say(f"cleaned up; {time.monotonic() - started:.0f}s in all")
    return outcome


def verify_checkpoints(run_dir: Path) -> list[str]:
    sys.path.insert(0, str(REPO))
    from rayexit.models import MultiExitForSequenceClassification
    from rayexit.train.checkpoints import read_checkpoint

    checkpoints = sorted(run_dir.glob("checkpoint_*"))
    bad = []
    for checkpoint in checkpoints:
        try:
            read_checkpoint(checkpoint, MultiExitForSequenceClassification.from_pretrained(checkpoint))
        except Exception as exc:
            bad.append(f"{checkpoint.name}: {exc}")
    say(f"checkpoints kept: {len(checkpoints)}; damaged: {bad or 'none'}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
