#!/usr/bin/env bash
# Memory of a job whose dataset is far larger than a worker's window:
#   bench/shards.sh [--small 1000000] [--large 2000000] [--epochs 1]
# Runs bench/shards-synthetic.toml (64 features, shards of 64,000 examples,
# 2 shards shuffled together, transfer-set shards of 62,500 examples; 2
# teachers, a student and a baseline, 2 workers of one thread) through bench/storage.py at two training-split
# sizes with the output folder and with SeaweedFS on loopback, and once at
# the small size with every shard in one window (a full shuffle), then
# writes bench/results/shards.{json,md}: peak RSS (VmHWM) of the
# coordinator and of each worker, wall time, and the models' test errors.
# Uses the dev-profile binaries (optimised; see Cargo.toml). Run it on an
# otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=1000000 LARGE=2000000 EPOCHS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --small) SMALL=$2; shift 2 ;;
    --large) LARGE=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
cargo build --bin coordinator --bin worker
WORK=target/bench/shards
rm -rf "$WORK" && mkdir -p "$WORK"
config() { # config NAME TRAIN WINDOW
  sed -e "s/^train_size = .*/train_size = $(($2 + 10000))/" \
      -e "s/^shuffle_window_shards = .*/shuffle_window_shards = $3/" \
      -e "s/^transfer_shards = .*/transfer_shards = $(($2 / 62500))/" \
      bench/shards-synthetic.toml > "$WORK/$1.toml"
}
run() { # run NAME TRAIN WINDOW [--s3]
  config "$1" "$2" "$3"
  echo "== $1: $2 training examples, windows of $3 shards ${4:-}"
  python3 bench/storage.py "$WORK/$1" "$WORK/$1.toml" --epochs "$EPOCHS" --bin-dir target/debug ${4:-} \
    > "$WORK/$1.json"
  local kind=local; [ -n "${4:-}" ] && kind=s3
  [ "$kind" = s3 ] || cp "$WORK/$1/local/job/report.json" "$WORK/$1.report.json"
}
run local-small "$SMALL" 2
run local-large "$LARGE" 2
run local-small-full-shuffle "$SMALL" 1000
(
  source scripts/s3-test-server.sh
  trap s3_test_server_stop EXIT
  run s3-small "$SMALL" 2 --s3
  run s3-large "$LARGE" 2 --s3
)
python3 - "$WORK" "bench/shards.sh --small $SMALL --large $LARGE --epochs $EPOCHS" "$SMALL" "$LARGE" << 'PY'
import json, os, sys
work, command, small, large = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names = ["local-small", "local-large", "local-small-full-shuffle", "s3-small", "s3-large"]
runs = {}
for n in names:
    r = json.load(open(f"{work}/{n}.json"))
    assert r["succeeded"], f"{n} failed"
    rep = f"{work}/{n}.report.json"
    if os.path.exists(rep):
        report = json.load(open(rep))
        r["test_errors"] = {m["name"]: m["test_errors"] for m in report["models"]}
        r["test_examples"] = report["test_examples"]
    runs[n] = r
mib = lambda b: f"{b / 2**20:,.0f}"
size = {"small": small, "large": large}
rows = []
for n, r in runs.items():
    p = r["processes"]
    workers = [v for k, v in sorted(p.items()) if k.startswith("worker")]
    errors = r.get("test_errors", {})
    shown = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "(as local)"
    window = "all (full shuffle)" if "full" in n else "2"
    rows.append(f"| {r['storage']} | {size[n.split('-')[1]]:,} | {window} | {r['wall_seconds']:.0f} | "
                f"{mib(p['coordinator']['peak_rss_bytes'])} | "
                + ", ".join(mib(w["peak_rss_bytes"]) for w in workers) + f" | {shown} |")
json.dump({"command": command, "runs": runs}, open("bench/results/shards.json", "w"), indent=1)
md = [f"# Datasets in shards: memory as the dataset grows (`{command}`)", "",
      "bench/shards-synthetic.toml: synthetic, 64 features, 12 classes, shards of 64,000 examples; "
      "2 teachers [128], a student [32] distilled at T = 4 and a baseline [32], "
      f"{runs['local-small']['epochs']} epoch(s) each, 2 workers of 1 thread; "
      "S3 is SeaweedFS on loopback. Peak RSS (VmHWM) in MiB; test errors out of "
      f"{runs['local-small'].get('test_examples', '?'):,}.", "",
      "| storage | training examples | window (shards) | wall s | coordinator MiB | workers MiB | test errors |",
      "|---|---:|---|---:|---:|---|---|"] + rows + [""]
open("bench/results/shards.md", "w").write("\n".join(md))
print("\n".join(md))
PY
