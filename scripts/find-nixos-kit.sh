#!/usr/bin/env bash
# Print the directory of the NixOS evaluation kit (nixpkgs lib + the real NixOS systemd files,
# see ../shared/nixos-eval/README.md): $EC_NIXPKGS_LIB when set, else ../shared/nixos-eval next
# to this checkout, next to the main checkout of a git worktree, or next to a local origin (a
# clean clone of a local repository). Exit 1, listing what was tried on stderr, when none has it.
# The kit is test data: it is never copied into this repository.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

candidates=()
if [[ -n "${EC_NIXPKGS_LIB:-}" ]]; then
	candidates+=("$EC_NIXPKGS_LIB")
else
	candidates+=("$repo_root/../shared/nixos-eval")
	if common=$(git -C "$repo_root" rev-parse --path-format=absolute --git-common-dir 2>/dev/null); then
		candidates+=("$(dirname "$common")/../shared/nixos-eval")
	fi
	if origin=$(git -C "$repo_root" config --get remote.origin.url 2>/dev/null); then
		origin=${origin#file://}
		if [[ -d "$origin" ]]; then
			candidates+=("$origin/../shared/nixos-eval" "$(dirname "$origin")/../shared/nixos-eval")
		fi
	fi
fi
for c in "${candidates[@]}"; do
	if [[ -f "$c/lib/default.nix" && -f "$c/nixos/lib/utils.nix" && -f "$c/nixos/modules/system/boot/systemd.nix" ]]; then
		kit=$(cd "$c" && pwd)
		case "$kit/" in
		"$repo_root"/*)
			echo "find-nixos-kit: $kit is inside this repository; the kit is never copied here" >&2
			exit 1
			;;
		esac
		echo "$kit"
		exit 0
	fi
done
echo "find-nixos-kit: no NixOS evaluation kit; tried: ${candidates[*]} (set EC_NIXPKGS_LIB)" >&2
exit 1
