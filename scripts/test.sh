#!/usr/bin/env bash
# Every test: the engine and the `moela` binary on the native adapter (lavapipe when there is no GPU), then the
# wasm package and the demo page in headless Chromium on WebGPU (SwiftShader).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --release --workspace
# The examples/ of the README, run as a user would (the shipped model).
cargo run --release -p moela --example generate
cargo run --release -p moela --example chat
cargo run --release -p moela --example batch

# moela serve on the loopback address, driven by the OpenAI Python client (installed if missing).
python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet openai \
  || python3 -m pip install --quiet --break-system-packages openai
serve_log="$(mktemp)"
cargo run --release -p moela-cli -- serve --port 0 > "$serve_log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do grep -q 'http://' "$serve_log" && break; sleep 0.2; done
url="$(grep -o 'http://[0-9.:]*' "$serve_log")/v1"
python3 scripts/test_serve.py "$url"
python3 examples/openai_client.py "$url"
kill "$server"

bash scripts/build-wasm.sh
(cd web && npm ci --no-audit --no-fund)
(cd web && npm test)
