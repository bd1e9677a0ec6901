#!/usr/bin/env bash
# Checks that two builds make the same job outputs, for refactors that must
# not change behaviour:
#   bench/same-outputs.sh OLD_BIN_DIR NEW_BIN_DIR [WORK_DIR]
# Each BIN_DIR holds a `coordinator` and a `worker` binary (for example a
# copy of target/debug/ from each commit). Runs examples/quickstart.toml and
# examples/specialists-synthetic.toml with each (2 local workers, --fresh),
# then compares the sha256 of every model, transfer-set file, evaluation and
# clusters file, and the reports without their times. A model file whose
# bytes differ is compared tensor by tensor (its metadata may differ when the
# model format moved), as is a manifest (its format fields). Prints the
# files that differ and exits 1 if any tensor, shard or report number does.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(cd "$1" && pwd)
NEW=$(cd "$2" && pwd)
WORK=${3:-target/same-outputs}
DATASETS=${DATASETS_DIR:-$(cd .. && pwd)/shared/datasets}
rm -rf "$WORK" && mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

run() { # run BIN OUT
  local bin=$1 out=$2
  mkdir -p "$out"
  for ex in quickstart specialists-synthetic; do
    sed -e "s#^output_dir = .*#output_dir = \"$out/$ex\"#" -e '/^cache_dir/d' \
      "examples/$ex.toml" > "$out/$ex.toml"
    DATASETS_DIR=$DATASETS "$bin/coordinator" --config "$out/$ex.toml" --fresh \
      --local-workers 2 > "$out/$ex.log" 2>&1
  done
  (cd "$out" && find quickstart specialists-synthetic -type f \
    \( -path '*/models/*' -o -path '*/transfer/*' -o -name evaluation.json -o -name clusters.json \) \
    | sort | xargs sha256sum) > "$out/sums.txt"
}

echo "== old build"; run "$OLD" "$WORK/old"
echo "== new build"; run "$NEW" "$WORK/new"
python3 - "$WORK" <<'EOF'
import json, sys
work = sys.argv[1]
def sums(side):
    return dict(reversed(l.split()) for l in open(f"{work}/{side}/sums.txt"))
def tensors(path):
    """A safetensors file's tensors as {name: (dtype, shape, bytes)}."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n:]
    return {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}
old, new = sums("old"), sums("new")
bad = False
for f in sorted(set(old) | set(new)):
    if old.get(f) != new.get(f):
        if f.endswith("manifest.json"):
            print(f"differs (format fields?): {f}")
        elif "/models/" in f and f in old and f in new and \
                tensors(f"{work}/old/{f}") == tensors(f"{work}/new/{f}"):
            print(f"same tensors, other metadata: {f}")
        else:
            bad = True
            print(f"DIFFERS: {f}")
def timeless(x):
    if isinstance(x, dict):
        return {k: timeless(v) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [timeless(v) for v in x]
    return x
for ex in ["quickstart", "specialists-synthetic"]:
    a = json.load(open(f"{work}/old/{ex}/report.json"))
    b = json.load(open(f"{work}/new/{ex}/report.json"))
    same = timeless(a) == timeless(b)
    bad |= not same
    print(f"{ex}: report {'equal' if same else 'DIFFERS'} (times aside)")
print(f"{len(new)} files compared")
sys.exit(1 if bad else 0)
EOF
