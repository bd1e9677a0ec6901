#!/usr/bin/env bash
# Where the bytes go with [storage] kind = "local" and kind = "s3":
#   bench/storage.sh [--epochs 1]
# Runs the MNIST pipeline of bench/comparison-mnist.toml (2 teachers, so that
# both workers train) through a release coordinator and 2 workers of one
# thread each, first with the output folder, then against SeaweedFS on
# loopback (scripts/s3-test-server.sh), and writes bench/results/storage.json
# and storage.md: wall time, peak RSS and system-call I/O of every process,
# the artifact bytes that crossed the coordinator over gRPC against those
# the workers moved to and from the bucket. Run it on an otherwise idle
# machine (the wall times are this machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --epochs) EPOCHS=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
cargo build --release --bin coordinator --bin worker
WORK=target/bench/storage
rm -rf "$WORK" && mkdir -p "$WORK"
export DATASETS_DIR=${DATASETS_DIR:-$(cd .. && pwd)/shared/datasets}
echo "== local storage"
python3 bench/storage.py "$WORK" bench/comparison-mnist.toml --epochs "$EPOCHS" > "$WORK/local.json"
echo "== S3 storage (SeaweedFS on loopback)"
(
  source scripts/s3-test-server.sh
  trap s3_test_server_stop EXIT
  python3 bench/storage.py "$WORK" bench/comparison-mnist.toml --epochs "$EPOCHS" --s3 > "$WORK/s3.json"
)
python3 - "$WORK" "bench/storage.sh --epochs $EPOCHS" << 'PY'
import json, sys
work, command = sys.argv[1], sys.argv[2]
runs = [json.load(open(f"{work}/{k}.json")) for k in ("local", "s3")]
assert all(r["succeeded"] for r in runs), "a run failed"
mib = lambda b: f"{b / 2**20:,.1f}"
rows = []
for r in runs:
    p = r["processes"]
    c = p["coordinator"]["counters"]
    grpc = c.get("distill_grpc_artifact_bytes_received_total", 0) + c.get("distill_grpc_artifact_bytes_sent_total", 0)
    workers = [v for k, v in sorted(p.items()) if k.startswith("worker")]
    moved = sum(w["counters"].get(k, 0) for w in workers for k in (
        "distill_worker_bytes_uploaded_total", "distill_worker_bytes_downloaded_total",
        "distill_worker_bucket_bytes_written_total", "distill_worker_bucket_bytes_read_total"))
    r["artifact_bytes_moved_by_workers"] = moved
    r["artifact_bytes_through_coordinator"] = grpc
    rows.append(f"| {r['storage']} | {r['wall_seconds']:.1f} | {mib(grpc)} | {mib(moved)} | "
                f"{grpc / moved:.3f} | {mib(p['coordinator']['rchar'])} / {mib(p['coordinator']['wchar'])} | "
                f"{mib(p['coordinator']['peak_rss_bytes'])} | "
                + ", ".join(f"{mib(w['peak_rss_bytes'])}" for w in workers) + " | "
                + ", ".join(f"{mib(w['counters'].get('distill_worker_bytes_downloaded_total', 0) + w['counters'].get('distill_worker_bucket_bytes_read_total', 0))}"
                            f" / {mib(w['counters'].get('distill_worker_bytes_uploaded_total', 0) + w['counters'].get('distill_worker_bucket_bytes_written_total', 0))}"
                            for w in workers) + " |")
json.dump({"command": command, "runs": runs}, open("bench/results/storage.json", "w"), indent=1)
md = [f"# Where the bytes go: local folder vs S3 (`{command}`)", "",
      "MNIST pipeline of bench/comparison-mnist.toml with 2 teachers, 2 workers of 1 thread, "
      f"{runs[0]['epochs']} epoch(s) per model; S3 is SeaweedFS on loopback. MiB throughout. "
      "'Through the coordinator': artifact payloads it received and sent over gRPC; "
      "'moved by workers': what they read and wrote (over gRPC or in the bucket); "
      "coordinator I/O: all its read()/write() system calls (sockets and files: the dataset it "
      "reads and, with S3, the dataset bundle it puts in the bucket).", "",
      "| storage | wall s | through the coordinator | moved by workers | ratio | coordinator I/O read / written | coordinator peak RSS | workers' peak RSS | workers read / wrote |",
      "|---|---|---|---|---|---|---|---|---|"] + rows
open("bench/results/storage.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
