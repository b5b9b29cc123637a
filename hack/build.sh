#!/usr/bin/env bash
# Release artifacts into target/dist/:
#   rsdn      the node daemon and tools
#   rsdn-cni  the CNI plugin, linked static-pie: it is copied onto hosts whose libc we do not
#             control, and skipping the dynamic loader saves ~0.3 ms per invocation here.
# These two are what the image ships (the Dockerfile runs this script). With --lab, also:
#   rsdn-lab  the development lab (`rsdn lab ...` runs it from next to rsdn), for hack/demo.sh,
#             hack/image-check.sh and the overlay benchmark.
# usage: hack/build.sh [--lab]
set -euo pipefail
cd "$(dirname "$0")/.."
lab=0
case "${1:-}" in
  --lab) lab=1 ;;
  "") ;;
  *) echo "usage: $0 [--lab]" >&2; exit 2 ;;
esac
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --quiet -p rsdn --bin rsdn
# With an explicit --target, RUSTFLAGS reach only target code, not build scripts/proc macros.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet -p rsdn-cni --bin rsdn-cni --target "$triple"
mkdir -p target/dist
cp target/release/rsdn target/dist/rsdn
cp "target/$triple/release/rsdn-cni" target/dist/rsdn-cni
echo "built target/dist/rsdn and target/dist/rsdn-cni ($(file -b target/dist/rsdn-cni | cut -d, -f1-2,4))"
if [ "$lab" -eq 1 ]; then
  cargo build --release --quiet -p rsdn-lab --bin rsdn-lab
  cp target/release/rsdn-lab target/dist/rsdn-lab
  echo "built target/dist/rsdn-lab"
fi
