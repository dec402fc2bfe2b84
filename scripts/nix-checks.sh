#!/usr/bin/env bash
# The Nix checks that run without nixpkgs and without network (called from the project's
# test command, as root on Debian with Rust):
#   1. every .nix file parses (nix-instantiate --parse, Debian's nix-bin);
#   2. every .nix file is formatted in the nixpkgs style (RFC 166 nixfmt; here the
#      nixfmt_rs crate, whose binary `nixfmt` is byte-compatible with nixpkgs' nixfmt);
#   3. deadnix finds no dead code;
#   4. the pure module-evaluation test nix/tests/module-eval.nix passes, when
#      EC_NIXPKGS_LIB names a checkout of nix-community/nixpkgs.lib (or of nixpkgs);
#      without it the check prints a SKIP line.
# Missing tools are installed (apt-get for nix-bin, cargo install for nixfmt and deadnix).
# VM tests and `nix flake check` need nixpkgs, KVM and network: see the NixOS section of README.md.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

export PATH="$HOME/.cargo/bin:$PATH"
# Nix must not reach for a daemon, substituters or the network; nothing here builds.
export NIX_REMOTE=""
export NIX_CONFIG=$'substituters =\nallow-import-from-derivation = false\nexperimental-features ='
NIX_STORE_FLAGS=(--store dummy://)

say() { printf 'nix-checks: %s\n' "$*"; }
die() {
	printf 'nix-checks: FAIL: %s\n' "$*" >&2
	exit 1
}

# --- tools ------------------------------------------------------------------------------
if ! command -v nix-instantiate >/dev/null 2>&1; then
	say "installing nix-bin (nix-instantiate)"
	apt_install() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y nix-bin >/dev/null; }
	apt_install || { apt-get -o DPkg::Lock::Timeout=600 update >/dev/null && apt_install; } ||
		die "could not install nix-bin with apt-get"
fi

cargo_install() { # crate binary
	local crate=$1 bin=$2
	command -v "$bin" >/dev/null 2>&1 && return 0
	say "installing $bin (cargo install $crate)"
	local target=${CARGO_TARGET_DIR:-/tmp/nixtools-target-$crate}
	CARGO_TARGET_DIR=$target cargo install --locked "$crate" ||
		CARGO_TARGET_DIR=$target cargo install "$crate" ||
		die "could not install $crate"
}
cargo_install nixfmt_rs nixfmt
cargo_install deadnix deadnix

# Nix 2.8 (Debian) knows the dummy store; fall back to the default store if not.
if ! nix-instantiate "${NIX_STORE_FLAGS[@]}" --eval -E '1' >/dev/null 2>&1; then
	NIX_STORE_FLAGS=()
fi
say "$(nix-instantiate --version), $(nixfmt --version 2>&1 | head -n1), $(deadnix --version 2>&1 | head -n1)"

# --- files ------------------------------------------------------------------------------
mapfile -t nix_files < <(
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
		git ls-files --cached --others --exclude-standard -- '*.nix'
	else
		find . -name '*.nix' -not -path './target/*' -not -path './.git/*' | sed 's|^\./||'
	fi | sort -u
)
existing=()
for f in "${nix_files[@]}"; do
	[[ -f "$f" ]] && existing+=("$f")
done
nix_files=("${existing[@]}")
((${#nix_files[@]} > 0)) || die "no .nix files found"
say "${#nix_files[@]} .nix files"

# --- 1. parse ---------------------------------------------------------------------------
failed=0
for f in "${nix_files[@]}"; do
	if ! out=$(nix-instantiate "${NIX_STORE_FLAGS[@]}" --parse "$f" 2>&1 >/dev/null); then
		printf '%s\n' "$out" >&2
		failed=1
	fi
done
((failed == 0)) || die "some .nix files do not parse"
say "OK parse: every .nix file parses"

# --- 2. format --------------------------------------------------------------------------
if ! nixfmt --check "${nix_files[@]}"; then
	die "the files listed above differ from nixfmt (RFC 166) formatting; run nixfmt on them"
fi
say "OK format: nixfmt --check"

# --- 3. lint ----------------------------------------------------------------------------
if ! deadnix --fail "${nix_files[@]}"; then
	die "deadnix found unused code"
fi
say "OK lint: deadnix --fail"

# --- 4. module evaluation ---------------------------------------------------------------
if [[ -z "${EC_NIXPKGS_LIB:-}" ]]; then
	say "SKIP module-eval: EC_NIXPKGS_LIB not set (no nixpkgs here)"
	exit 0
fi
lib_dir=$(cd "$EC_NIXPKGS_LIB" && pwd)
[[ -f "$lib_dir/lib/default.nix" ]] ||
	die "EC_NIXPKGS_LIB=$EC_NIXPKGS_LIB has no lib/default.nix (want a nixpkgs.lib or nixpkgs checkout)"
case "$lib_dir/" in
"$repo_root"/*) die "EC_NIXPKGS_LIB must be outside this repository (it is never committed)" ;;
esac
say "module-eval against $lib_dir"
if ! summary=$(nix-instantiate "${NIX_STORE_FLAGS[@]}" --eval --strict \
	-I "ec-nixpkgs-lib=$lib_dir" \
	-E 'removeAttrs (import ./nix/tests/module-eval.nix { lib = import <ec-nixpkgs-lib/lib>; }) [ "checks" ]'); then
	die "module-eval failed (see the message above)"
fi
say "module-eval summary: $summary"
say "OK module-eval"
