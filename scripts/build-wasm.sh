#!/usr/bin/env bash
# Builds the wasm package into web/pkg: the engine compiled to wasm32, bound with wasm-bindgen-cli at
# exactly the wasm-bindgen version crates/moela-wasm locks (installed from crates.io when missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
crate="$root/crates/moela-wasm"

version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$crate/Cargo.lock")
if [ -z "$version" ]; then
  echo "cannot find the wasm-bindgen version in crates/moela-wasm/Cargo.lock" >&2
  exit 1
fi
if [ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" != "$version" ]; then
  # --locked first, as published; if a locked dependency is not in the registry any more, resolve afresh.
  cargo install --locked wasm-bindgen-cli --version "$version" ||
    cargo install wasm-bindgen-cli --version "$version"
fi
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

# The crate's .cargo/config.toml sets the target and getrandom's browser backend. Its build folder sits inside
# the native one (a folder of its own: the two builds must not share fingerprints).
target_dir="${CARGO_TARGET_DIR:-$root/target}/wasm"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
(cd "$crate" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked)
wasm-bindgen --target web --out-dir "$root/web/pkg" --out-name moela_wasm \
  "$target_dir/wasm32-unknown-unknown/release/moela_wasm.wasm"
# The package ships the default model next to pkg/ (DEFAULT_MODEL in src/moela.js).
rm -rf "$root/web/model" && mkdir -p "$root/web/model"
cp "$root"/models/moela-arith-tiny/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,generation_config.json,README.md} \
  "$root/web/model/"
echo "built $root/web/pkg and $root/web/model"
