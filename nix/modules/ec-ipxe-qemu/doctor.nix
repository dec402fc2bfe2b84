# `every-channel-ipxe-qemu-doctor [--json]`: the unit's own command line (runArgs, with
# `doctor` for `run`) run as the unit's user, so it predicts what the unit will meet
# without starting it. Root drops to that user with setpriv; the user runs it directly.
# The caller's arguments go before the unit's, which may end in `-- EXTRA_QEMU_ARGS`.
{
  lib,
  pkgs,
  package,
  runArgs,
  user,
  group,
}:

pkgs.writeShellScriptBin "every-channel-ipxe-qemu-doctor" ''
  set -eu
  doctor=(${
    lib.escapeShellArgs [
      "${package}/bin/ec-ipxe-qemu"
      "doctor"
    ]
  } "$@" ${lib.escapeShellArgs (lib.drop 2 runArgs)})
  if [ "$(${pkgs.coreutils}/bin/id -u)" -eq 0 ]; then
    exec ${pkgs.util-linux}/bin/setpriv --reuid=${user} --regid=${group} \
      --init-groups --reset-env -- "''${doctor[@]}"
  fi
  if [ "$(${pkgs.coreutils}/bin/id -un)" = ${user} ]; then
    exec "''${doctor[@]}"
  fi
  echo "every-channel-ipxe-qemu-doctor: run it as root (or as ${user}): it checks as the unit's user ${user}" >&2
  exit 5
''
