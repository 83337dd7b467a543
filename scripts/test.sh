#!/usr/bin/env bash
# Every test: the engine and the `moela` binary on the native adapter (lavapipe when there is no GPU), then the
# wasm package and the demo page in headless Chromium on WebGPU (SwiftShader).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --release --workspace
# The examples/ of the README, run as a user would (the shipped model).
cargo run --release -p moela --example generate
cargo run --release -p moela --example chat

bash scripts/build-wasm.sh
(cd web && npm ci --no-audit --no-fund)
(cd web && npm test)
