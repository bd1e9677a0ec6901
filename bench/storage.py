"""Where a job's bytes go, with `[storage] kind = "local"` and `"s3"`:

    python3 bench/storage.py WORK_DIR CONFIG [--epochs N] [--workers 2] [--s3]

(bench/storage.sh builds the binaries, starts SeaweedFS and runs both.)
Runs CONFIG (an MNIST pipeline) through a release `coordinator` and
`--workers` separately started `worker` processes, one compute thread each,
and samples every process four times a second until it exits: peak RSS
(VmHWM), bytes read and written through system calls (`/proc/PID/io`
rchar/wchar: sockets and files together), and their Prometheus counters:
artifact bytes over gRPC (the coordinator's
distill_grpc_artifact_bytes_{received,sent}_total, the workers'
distill_worker_bytes_{uploaded,downloaded}_total) and in the bucket (the
workers' distill_worker_bucket_bytes_{written,read}_total). With --s3 the
config gets a [storage] table for the server in DISTILL_TEST_S3_ENDPOINT /
DISTILL_TEST_S3_BUCKET (credentials in AWS_*). Prints one JSON object."""

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.request

TOKEN = secrets.token_hex(16)


def proc_sample(pid):
    """(peak RSS bytes, rchar, wchar) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        with open(f"/proc/{pid}/io") as f:
            io = dict(l.split(": ") for l in f.read().splitlines())
        return hwm, int(io["rchar"]), int(io["wchar"])
    except (OSError, StopIteration):
        return None


def counters(url):
    """The Prometheus counters at `url` as {name: value} (empty when down)."""
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(distill_[a-z_]+_total)(?:\{[^}]*\})? ([0-9.e+]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(2))
    return out


class Watched:
    """A process, sampled until it exits; the last sample is kept."""

    def __init__(self, name, args, env, metrics=None):
        self.name, self.metrics = name, metrics
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines, self.sample, self.counters = [], None, {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def poll(self):
        sample = proc_sample(self.proc.pid)
        if sample and self.proc.poll() is None:
            self.sample = sample
            if self.metrics:
                self.counters = counters(self.metrics) or self.counters

    def result(self):
        hwm, rchar, wchar = self.sample or (0, 0, 0)
        return {"peak_rss_bytes": hwm, "rchar": rchar, "wchar": wchar,
                "counters": self.counters, "exit": self.proc.returncode}


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("config")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--bin-dir", default="target/release")
    a = ap.parse_args()
    kind = "s3" if a.s3 else "local"
    work = os.path.abspath(os.path.join(a.work, kind))
    os.makedirs(work, exist_ok=True)
    text = open(a.config).read()
    text = re.sub(r"(?m)^output_dir = .*", 'output_dir = "job"', text)
    text = re.sub(r"(?m)^epochs = .*", f"epochs = {a.epochs}", text)
    text = re.sub(r"(?m)^count = 1$", f"count = {a.workers}", text)
    if a.s3:
        text += ('\n[storage]\nkind = "s3"\nbucket = "{}"\nprefix = "bench-storage"\n'
                 'endpoint = "{}"\nregion = "us-east-1"\nallow_http = true\n').format(
                     os.environ["DISTILL_TEST_S3_BUCKET"], os.environ["DISTILL_TEST_S3_ENDPOINT"])
    config = os.path.join(work, "cluster.toml")
    with open(config, "w") as f:
        f.write(text)
    env = dict(os.environ, DISTILL_CLUSTER_TOKEN=TOKEN)
    started = time.time()
    coordinator = Watched("coordinator", [
        f"{a.bin_dir}/coordinator", "--config", config, "--fresh", "--listen", "127.0.0.1:0",
        "--status-listen", "127.0.0.1:0", "--linger", "600"], env)
    url = status = None
    while (url is None or status is None) and coordinator.proc.poll() is None:
        for line in list(coordinator.lines):
            if line.startswith("coordinator listening on "):
                url = line.split()[-1]
            if line.startswith("status page on "):
                status = line.split()[-1]
        time.sleep(0.05)
    if url is None or status is None:
        sys.exit("the coordinator did not start:\n" + "".join(coordinator.lines[-30:]))
    coordinator.metrics = f"{status.rstrip('/')}/metrics?token={TOKEN}"
    workers = []
    for i in range(a.workers):
        port = free_port()
        workers.append(Watched(f"worker-{i}", [
            f"{a.bin_dir}/worker", "--coordinator", url, "--cpu", "--threads", "1",
            "--scratch", os.path.join(work, f"w{i}"),
            "--metrics-listen", f"127.0.0.1:{port}"], env, f"http://127.0.0.1:{port}/metrics"))
    everyone = [coordinator] + workers
    while any(w.proc.poll() is None for w in workers):
        for w in everyone:
            w.poll()
        time.sleep(0.25)
    wall = time.time() - started
    for _ in range(4):  # the coordinator lingers: its last counters
        coordinator.poll()
        time.sleep(0.25)
    coordinator.proc.terminate()
    coordinator.proc.wait(timeout=60)
    log = "".join(coordinator.lines)
    done = "job done" in log
    result = {"storage": kind, "epochs": a.epochs, "workers": a.workers, "wall_seconds": wall,
              "succeeded": done and all(w.proc.returncode == 0 for w in workers),
              "processes": {w.name: w.result() for w in everyone}}
    if not result["succeeded"]:
        sys.stderr.write(log[-5000:])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
