# Evaluation test of nix/modules/ec-ipxe-qemu.nix and nix/modules/ec-publisher-guest.nix
# against the REAL NixOS code (see ../nixos.nix): the real `systemd.services` and
# `systemd.network` option types, the real `utils`, the real unit text generation. Only
# `pkgs` and the NixOS options outside the systemd modules are stubbed.
#
# `nixpkgs`: the offline kit (../shared/nixos-eval, what scripts/nix-checks.sh passes) or
# a nixpkgs checkout (the flake's module-eval check passes its pinned input). Any
# mismatch throws, so the evaluation fails; on success it returns a summary and the
# rendered units (`units`, `scripts`), which scripts/nix-checks.sh hands to
# `systemd-analyze verify` and `systemd-analyze security`.
#
# `systemdVersion` (default: NixOS 25.11's 258): the systemd the units are rendered for.
# scripts/nix-checks.sh passes the local systemd's version, so `units` are what NixOS would
# install for the systemd-analyze that verifies them; checks that depend on the version pin
# it themselves.
#
# The checks live by topic next to this file, each a function of the helpers in
# ./common.nix: defaults.nix, assertions.nix, types.nix, command-lines.nix, rendered.nix,
# credentials.nix, refusals.nix (tests/data/refusals.json, also against
# nix/lib/validate.nix), guest.nix and doctor.nix.
#
#   nix-instantiate --eval --strict -E 'import ./nix/tests/module-eval { nixpkgs = /path/to/kit; }'
{
  nixpkgs,
  systemdVersion ? "258",
}:

let
  t = import ./common.nix { inherit nixpkgs systemdVersion; };
  inherit (t)
    evalConfig
    enabled
    textOf
    lanDerived
    lanExplicit
    httpExtra
    forge
    ;

  defaults = import ./defaults.nix t;
  assertions = import ./assertions.nix t;
  types = import ./types.nix t;
  commandLines = import ./command-lines.nix t;
  rendered = import ./rendered.nix t;
  credentials = import ./credentials.nix t;
  refusals = import ./refusals.nix t;
  guest = import ./guest.nix t;
  doctor = import ./doctor.nix t;

  # ---------------------------------------------------------------- for systemd-analyze
  # Unit files by configuration, as NixOS would install them; scripts by store path.
  hostUnits = config: {
    "every-channel-ipxe-qemu.service" = textOf config;
  };
  units = {
    user-mode = hostUnits (evalConfig [ enabled ]);
    lan = hostUnits lanDerived;
    lan-explicit = hostUnits lanExplicit;
    http-extra = hostUnits httpExtra;
    credentials = hostUnits credentials.config;
    example-forge-host = hostUnits forge;
    example-lan-host = hostUnits lanDerived;
    guest = guest.units;
  };
  # the guest's service scripts and the host's doctor wrapper, for `bash -n`
  scripts = guest.scripts // doctor.scripts;

  all =
    defaults.defaultChecks
    ++ defaults.disabledChecks
    ++ defaults.unitChecks
    ++ assertions.assertionChecks
    ++ types.typeChecks
    ++ commandLines.execChecks
    ++ commandLines.warningChecks
    ++ commandLines.cacheChecks
    ++ rendered.renderedChecks
    ++ refusals.refusalChecks
    ++ refusals.validatorChecks
    ++ credentials.credentialChecks
    ++ doctor.doctorChecks
    ++ guest.guestChecks;
  inherit (refusals) refusalTable refusedBadValues coveredCases;
in
builtins.deepSeq all {
  result = "module-eval: all ${toString (builtins.length all)} checks passed";
  nixos = "real NixOS systemd modules and utils from ${toString nixpkgs}";
  defaults = builtins.length defaults.defaultChecks;
  unit = builtins.length (defaults.disabledChecks ++ defaults.unitChecks);
  assertions = builtins.length assertions.assertionChecks;
  types = builtins.length types.typeChecks;
  commandLines = builtins.length commandLines.execChecks;
  warnings = builtins.length commandLines.warningChecks;
  bootCache = builtins.length commandLines.cacheChecks;
  renderedUnits = builtins.length rendered.renderedChecks;
  credentials = builtins.length credentials.credentialChecks;
  guest = builtins.length guest.guestChecks;
  doctorWrapper = builtins.length doctor.doctorChecks;
  refusalTable = "${toString (builtins.length refusalTable.cases)} values: ${toString (builtins.length refusedBadValues)} bad ones refused at evaluation, ${
    toString (builtins.length refusalTable.cases - builtins.length refusedBadValues)
  } good ones accepted";
  validateNix = "${toString (builtins.length coveredCases)} values of the table checked against nix/lib/validate.nix directly";
  checks = all;
  inherit units scripts;
}
