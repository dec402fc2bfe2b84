# Module-eval, part 5: the unit text NixOS renders (the real systemd-lib.nix), for several
# systemd versions.
{
  nixos,
  lib,
  evalConfig,
  enabled,
  unitOf,
  expectEq,
  expect,
  forge,
  lanDerived,
  httpExtra,
  textOf,
  linesOf,
  sectionOf,
  ...
}:

let
  # ---------------------------------------------------------------- rendered unit text
  # What NixOS writes to /etc/systemd/system, from the real systemd-lib.nix.
  hasLine =
    name: section: line: config:
    expect "${name}: [${section}] has ${line}" (lib.elem line (
      sectionOf section (textOf config)
    )) "missing in:\n${textOf config}";
  # The host unit rendered for a given systemd version (config.systemd.package).
  withSystemd =
    version:
    evalConfig [
      enabled
      { systemd.package = lib.mkForce (nixos.fakeSystemd version); }
    ];
  userMode = evalConfig [ enabled ];
  renderedChecks =
    map (line: hasLine "user-mode" "Service" line userMode) [
      "RestartPreventExitStatus=2"
      "Type=notify"
      "NotifyAccess=main"
      "TimeoutStartSec=960"
      "Restart=always"
      "RestartSec=5s"
      "User=every-channel-ipxe-qemu"
      "CapabilityBoundingSet="
      "DeviceAllow=char-macvtap rwm"
      "ProtectSystem=strict"
      "StateDirectory=every-channel/ipxe-qemu"
    ]
    # RestartSteps= and RestartMaxDelaySec= from systemd 254 on
    ++
      lib.concatMap
        (
          version:
          map (line: hasLine "systemd ${version}" "Service" line (withSystemd version)) [
            "RestartSteps=5"
            "RestartMaxDelaySec=5min"
          ]
        )
        [
          "254"
          "258"
        ]
    ++ [
      (hasLine "systemd 252" "Service" "RestartSec=5s" (withSystemd "252"))
      (expect "systemd 253: no RestartSteps= or RestartMaxDelaySec= (it would warn about unknown keys)" (
        !(lib.any (l: lib.hasPrefix "RestartSteps=" l || lib.hasPrefix "RestartMaxDelaySec=" l) (
          linesOf (textOf (withSystemd "253"))
        ))
      ) (textOf (withSystemd "253")))
      (hasLine "user-mode" "Unit" "StartLimitIntervalSec=0" userMode)
      (hasLine "user-mode" "Install" "WantedBy=multi-user.target" userMode)
      (hasLine "forge" "Service" "ExecStart=${(unitOf forge).serviceConfig.ExecStart}" forge)
      (hasLine "lan" "Service" "ExecStartPre=${(unitOf lanDerived).serviceConfig.ExecStartPre}"
        lanDerived
      )
      (hasLine "lan" "Service" "ExecStopPost=${(unitOf lanDerived).serviceConfig.ExecStopPost}"
        lanDerived
      )
      (hasLine "lan" "Unit" "Wants=sys-subsystem-net-devices-eno1.device" lanDerived)
      (hasLine "http+extraArgs" "Service" "ExecStart=${(unitOf httpExtra).serviceConfig.ExecStart}"
        httpExtra
      )
      (hasLine "http+extraArgs" "Service" "ReadWritePaths=/srv/ec-guest" httpExtra)
      (expect "user-mode unit has no ExecStartPre line" (
        !(lib.any (lib.hasPrefix "ExecStartPre=") (linesOf (textOf userMode)))
      ) "user-mode only must not touch host links")
      # The real serviceConfig type renders every key systemd reads; no key is dropped.
      (expectEq "every serviceConfig key is rendered" [ ] (
        lib.filter (k: !(lib.any (lib.hasPrefix "${k}=") (sectionOf "Service" (textOf lanDerived)))) (
          lib.attrNames (unitOf lanDerived).serviceConfig
        )
      ))
    ];
in
{
  inherit renderedChecks;
}
