#!/usr/bin/env bash
# Runs benchmark experiments through the real coordinator and workers:
#   bench/run.sh bench/experiments/mnist.toml [more.toml ...]
# Builds the release binaries first, then writes each experiment's tables
# and plots into bench/results/ and its block of bench/README.md. Jobs run
# under target/bench/; a stopped run resumes where it stopped (finished
# jobs and cached tasks are not redone). Clear target/bench/cache after
# changing how models are trained.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin coordinator --bin worker --bin experiments
exec target/release/experiments "$@"
