#!/usr/bin/env bash
# The Nix checks that run without nixpkgs and without network (called from the project's
# test command, as root on Debian with Rust):
#   1. every .nix file parses (nix-instantiate --parse, Debian's nix-bin);
#   2. every .nix file is formatted in the nixpkgs style (RFC 166 nixfmt; here the
#      nixfmt_rs crate, whose binary `nixfmt` is byte-compatible with nixpkgs' nixfmt);
#   3. deadnix finds no dead code;
#   4. nix/tests/module-eval/ passes against the real NixOS systemd code of the kit in
#      ../shared/nixos-eval (or $EC_NIXPKGS_LIB); under CI=true a missing kit fails;
#   5. the units it renders pass systemd-analyze verify, the host unit's
#      systemd-analyze security exposure is at most 3.0, and the guest's .network/.link
#      files parse cleanly in systemd-networkd and udev.
# Missing tools are installed (apt-get for nix-bin, cargo install for nixfmt and deadnix).
# VM tests and `nix flake check` need nixpkgs, KVM and network: see docs/nixos.md ("Checks").
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

# --- 4. module evaluation against the real NixOS code -------------------------------------
# The kit (../shared/nixos-eval: nixpkgs lib + the real NixOS systemd files) is test data,
# found by scripts/find-nixos-kit.sh and never copied here. Under CI=true a missing kit fails.
kit_err=$(mktemp)
if ! kit=$(scripts/find-nixos-kit.sh 2>"$kit_err"); then
	tried=$(cat "$kit_err")
	rm -f "$kit_err"
	if [[ "${CI:-}" == true || "${CI:-}" == 1 ]]; then
		die "module-eval: $tried (CI=true: a failure, not a skip)"
	fi
	say "SKIP module-eval and unit checks: $tried"
	exit 0
fi
rm -f "$kit_err"
# The units are rendered for the local systemd (the one whose systemd-analyze checks them
# below): keys newer than it, such as RestartSteps= (254), are left out as on such a host.
systemd_version=$(systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9][0-9]*\).*/\1/p')
[[ -n "$systemd_version" ]] || die "could not read the local systemd version (systemctl --version; scripts/install-deps.sh installs systemd)"
say "module-eval against $kit, units rendered for the local systemd $systemd_version"
eval_expr() { # attribute names to keep from the result
	nix-instantiate "${NIX_STORE_FLAGS[@]}" --eval --strict --json \
		--arg nixpkgs "$kit" --argstr systemdVersion "$systemd_version" \
		-E "{ nixpkgs, systemdVersion }: let r = import ./nix/tests/module-eval { inherit nixpkgs systemdVersion; }; in $1"
}
if ! summary=$(eval_expr 'removeAttrs r [ "checks" "units" "scripts" ]'); then
	die "module-eval failed (see the message above)"
fi
say "module-eval summary: $summary"
say "OK module-eval"

# --- 5. the rendered units, checked by systemd itself ------------------------------------
# Every unit the modules render (host: user-mode only, LAN, each nix/examples host, ...;
# guest: its services and .link/.network files) with its /nix/store executables replaced by
# real ones: systemd-analyze verify must print nothing, the host unit's exposure must be at
# most 3.0, networkd and udev must parse the .network and .link files without a complaint.
for tool in systemd-analyze /lib/systemd/systemd-networkd; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (scripts/install-deps.sh installs systemd)"
done
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
bin_dir=$target_dir/debug
if [[ ! -x "$bin_dir/ec-ipxe-qemu" || ! -x "$bin_dir/ec-macvtap" ]]; then
	say "building the binaries the units run"
	cargo build --quiet --bins
fi
qemu_bin=$(command -v qemu-system-x86_64 || true)
[[ -n "$qemu_bin" ]] || die "qemu-system-x86_64 is missing (scripts/install-deps.sh installs it)"
udevadm_bin=$(command -v udevadm || true)
if [[ -z "$udevadm_bin" ]]; then
	# Only the udevadm binary of Debian's udev package (same systemd version), unpacked in a
	# cache: installing the package would start a machine-wide udevd.
	cache=${XDG_CACHE_HOME:-$HOME/.cache}/ec-ipxe-qemu/udev
	if [[ ! -x "$cache/bin/udevadm" ]]; then
		say "fetching udevadm (apt-get download udev) into $cache"
		rm -rf "$cache" && mkdir -p "$cache"
		(cd "$cache" && apt-get download udev >/dev/null 2>&1 && dpkg-deb -x udev_*.deb .) ||
			die "could not fetch udevadm (apt-get download udev)"
	fi
	udevadm_bin=$cache/bin/udevadm
fi

work=$(mktemp -d /tmp/ec-unit-checks.XXXXXX)
trap 'rm -rf "$work"' EXIT
eval_expr '{ inherit (r) units scripts; }' >"$work/units.json" || die "rendering the units failed"
# Lay out units/<configuration>/<unit> with the executables replaced, and write the scripts.
python3 - "$work" "$bin_dir" "$(dirname "$qemu_bin")" <<'PY' || die "could not lay out the rendered units"
import json, os, re, subprocess, sys
work, bin_dir, qemu_dir = sys.argv[1:]
data = json.load(open(os.path.join(work, "units.json")))
subst = [
    (re.compile(r"/nix/store/[0-9a-z]{32}-ec-ipxe-qemu-[^/]*/bin/"), bin_dir + "/"),
    (re.compile(r"/nix/store/[0-9a-z]{32}-qemu-[^/]*/bin/"), qemu_dir + "/"),
    (re.compile(r"/nix/store/[0-9a-z]{32}-ipxe-[^/]*/"), "/usr/lib/ipxe/"),
]
os.makedirs(os.path.join(work, "scripts"))
for store_path, text in data["scripts"].items():
    real = os.path.join(work, "scripts", store_path.rsplit("-", 1)[0].split("/")[-1] + "-" + store_path.split("-", 1)[1])
    with open(real, "w") as f:
        f.write("#!/bin/bash\n" + text)
    os.chmod(real, 0o755)
    r = subprocess.run(["bash", "-n", real], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"script {store_path} does not parse:\n{r.stderr}")
    subst.append((re.compile(re.escape(store_path)), real))
for conf, units in data["units"].items():
    d = os.path.join(work, "units", conf)
    os.makedirs(d)
    for name, text in units.items():
        for rx, real in subst:
            text = rx.sub(real, text)
        for line in text.splitlines():
            m = re.match(r"(Exec\w+)=[-+@:!]*\"?(/nix/store/[^\" ]*)", line)
            if m:
                sys.exit(f"{conf}/{name}: {m.group(1)} still runs {m.group(2)}")
        open(os.path.join(d, name), "w").write(text)
PY

# The guest's units use ImportCredential= (systemd 254, which NixOS guests have). An older
# systemd here says "Unknown key" for it and nothing else changes, so that one line is
# dropped for guest units when this systemd is older than 254.
host_systemd=$(systemctl --version | awk 'NR == 1 { print $2 }')
failed=0
for dir in "$work"/units/*/; do
	conf=$(basename "$dir")
	for unit in "$dir"*.service; do
		[[ -e "$unit" ]] || continue
		rc=0
		out=$(systemd-analyze verify --man=no "$unit" 2>&1) || rc=$?
		if [[ "$conf" == guest && "$host_systemd" -lt 254 ]]; then
			out=$(printf '%s\n' "$out" | grep -v ": Unknown key 'ImportCredential' in section \[Service\], ignoring\.$" || true)
		fi
		if ((rc != 0)) || [[ -n "$out" ]]; then
			printf 'nix-checks: systemd-analyze verify %s/%s:\n%s\n' "$conf" "$(basename "$unit")" "$out" >&2
			failed=1
		fi
	done
done
((failed == 0)) || die "systemd-analyze verify complained about the rendered units"
say "OK systemd-analyze verify: $(find "$work/units" -name '*.service' | wc -l) rendered services ($(ls "$work/units" | tr '\n' ' '))"

for conf in user-mode lan example-forge-host example-lan-host; do
	unit=$work/units/$conf/every-channel-ipxe-qemu.service
	out=$(systemd-analyze security --offline=yes --threshold=30 --no-pager "$unit" 2>&1) ||
		die "systemd-analyze security: the $conf host unit is above 3.0:
$out"
	score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
	[[ -n "$score" ]] || die "systemd-analyze security printed no exposure level for $conf:
$out"
	say "OK systemd-analyze security: $conf host unit exposure $score (at most 3.0)"
done

# .network files: systemd-networkd parses them (in a throwaway mount and network namespace);
# .link files: udev's net_setup_link builtin does. Any "FILE:LINE: ..." line is a complaint.
mkdir -p "$work/network"
cp "$work"/units/guest/*.link "$work"/units/guest/*.network "$work/network/"
out=$(unshare --mount --net --propagation private sh -c '
	mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/network || exit 1
	for d in /etc/systemd/network /usr/lib/systemd/network /lib/systemd/network; do
		[ -d "$d" ] && mount -t tmpfs tmpfs "$d"
	done
	cp "$1"/* /run/systemd/network/
	SYSTEMD_LOG_LEVEL=info timeout 3 /lib/systemd/systemd-networkd 2>&1
	"$2" test-builtin net_setup_link /sys/class/net/lo 2>&1
	true' sh "$work/network" "$udevadm_bin")
parsed=$(printf '%s\n' "$out" | grep -c '^Parsed configuration file "/run/systemd/network/.*\.link"' || true)
complaints=$(printf '%s\n' "$out" | grep -E '^/run/systemd/network/[^:]+:[0-9]+: ' || true)
[[ -z "$complaints" ]] || die "the guest's .network/.link files have problems:
$complaints"
n_links=$(find "$work/network" -name '*.link' | wc -l)
((parsed == n_links)) || die "udev parsed $parsed of $n_links .link files:
$out"
say "OK networkd/udev: $(find "$work/network" -name '*.network' | wc -l) .network and $n_links .link files parse cleanly"
