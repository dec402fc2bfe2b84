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
  renderedChecks = [
    (hasLine "user-mode" "Service" "RestartPreventExitStatus=2" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "Type=notify" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "NotifyAccess=main" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "TimeoutStartSec=960" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "Restart=always" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "RestartSec=5s" (evalConfig [ enabled ]))
    (hasLine "systemd 254" "Service" "RestartSteps=5" (withSystemd "254"))
    (hasLine "systemd 254" "Service" "RestartMaxDelaySec=5min" (withSystemd "254"))
    (hasLine "systemd 258" "Service" "RestartSteps=5" (withSystemd "258"))
    (hasLine "systemd 258" "Service" "RestartMaxDelaySec=5min" (withSystemd "258"))
    (hasLine "systemd 252" "Service" "RestartSec=5s" (withSystemd "252"))
    (expect "systemd 253: no RestartSteps= or RestartMaxDelaySec= (it would warn about unknown keys)" (
      !(lib.any (l: lib.hasPrefix "RestartSteps=" l || lib.hasPrefix "RestartMaxDelaySec=" l) (
        linesOf (textOf (withSystemd "253"))
      ))
    ) (textOf (withSystemd "253")))
    (hasLine "user-mode" "Service" "User=every-channel-ipxe-qemu" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "CapabilityBoundingSet=" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "DeviceAllow=char-macvtap rwm" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "ProtectSystem=strict" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Service" "StateDirectory=every-channel/ipxe-qemu" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Unit" "StartLimitIntervalSec=0" (evalConfig [ enabled ]))
    (hasLine "user-mode" "Install" "WantedBy=multi-user.target" (evalConfig [ enabled ]))
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
      !(lib.any (lib.hasPrefix "ExecStartPre=") (linesOf (textOf (evalConfig [ enabled ]))))
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
