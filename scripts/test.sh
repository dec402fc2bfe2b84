#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, then formatting, lint, docs, every Rust test
# (unit, privileged netns, real QEMU + iPXE + dnsmasq end-to-end) with CI=true so nothing privileged is
# skipped, and the offline Nix checks. Run as root on Debian/Ubuntu with Rust.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "test: run as root (the tests create network namespaces and macvtaps)" >&2
	exit 5
fi
scripts/install-deps.sh
export CI=true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --all-features -- -D warnings
echo "== cargo doc (links and HTML checked; the private launcher too)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features --document-private-items
echo "== test guest (Debian cloud kernel + busybox initramfs, cached under target/test-guest)"
scripts/build-test-guest.sh >/dev/null
echo "== cargo test"
cargo test --all-features --no-fail-fast -- --include-ignored --test-threads="${EC_TEST_THREADS:-4}"
echo "== gen-assets (man pages and completions)"
assets=$(mktemp -d)
trap 'rm -rf "$assets"' EXIT
cargo run -q --features gen-assets --bin ec-gen-assets -- "$assets"
test -s "$assets/man/ec-macvtap-create.1" && test -s "$assets/completions/_ec-ipxe-qemu"
echo "== nix checks"
scripts/nix-checks.sh
echo "== all tests passed"
