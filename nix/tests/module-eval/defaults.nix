# Module-eval, part 1: the option defaults, a disabled module, and the unit's settings with
# the defaults (the hardening, the restart policy, the user). Called from ./default.nix with
# the helpers of ./common.nix.
{
  lib,
  fakePkgs,
  evalConfig,
  opt,
  enabled,
  with',
  unitOf,
  hostNetworkingChecks,
  failedAssertions,
  expectEq,
  expect,
  disabledConfig,
  defaultUnit,
  sc,
  ...
}:

let
  defaultCfg = lib.getAttrFromPath opt (evalConfig [ enabled ]);
  defaultChecks =
    lib.mapAttrsToList
      (
        path: expected:
        expectEq "default ${path}" expected (
          lib.attrByPath (lib.splitString "." path) "<missing>" defaultCfg
        )
      )
      {
        "enable" = true;
        "package" = fakePkgs.ec-ipxe-qemu;
        "qemuPackage" = fakePkgs.qemu_kvm;
        "stateDir" = "/var/lib/every-channel/ipxe-qemu";
        "memory" = 2048;
        "cpus" = 2;
        "accel" = "auto";
        "disk.enable" = true;
        "disk.path" = "/var/lib/every-channel/ipxe-qemu/disk.qcow2";
        "disk.size" = "32G";
        "boot.url" = null;
        "boot.ipxePackage" = fakePkgs.ipxe;
        "boot.userNet.dnsServers" = [ ];
        "boot.userNet.hostname" = null;
        "boot.userNet.model" = null;
        "boot.userNet.hostForwards" = [ ];
        "boot.http.enable" = false;
        "boot.http.directory" = null;
        "boot.http.bindAddress" = null;
        "boot.http.port" = null;
        "lan.enable" = false;
        "lan.model" = null;
        "lan.vhost" = "auto";
        "lan.macvtap.interface" = null;
        "lan.macvtap.name" = "ec-lan0";
        "lan.macvtap.mode" = "bridge";
        "lan.macvtap.macAddress" = null;
        "lan.macvtap.queues" = 1;
        "boot.readyPattern" = null;
        "boot.readyTimeout" = 900;
        "watchdogSec" = null;
        "extraArgs" = [ ];
      };

  disabledChecks = [
    (expect "disabled: no unit" (
      !(disabledConfig.systemd.services ? every-channel-ipxe-qemu)
    ) "the unit exists although enable = false")
    (expect "disabled: no user" (
      !(lib.attrByPath [ "users" "users" ] { } disabledConfig ? every-channel-ipxe-qemu)
    ) "the user exists although enable = false")
    (expectEq "disabled: no assertions of ours" [ ] (failedAssertions disabledConfig))
  ]
  ++ hostNetworkingChecks "disabled" disabledConfig null;

  readyUnit = unitOf (evalConfig [
    (with' {
      enable = true;
      boot.readyPattern = "^login: ?$";
      boot.readyTimeout = 0;
      watchdogSec = 30;
    })
  ]);
  unitChecks = [
    (expectEq "unit Type: the launcher says READY=1 when the guest is up" "notify" sc.Type)
    (expectEq "unit NotifyAccess" "main" sc.NotifyAccess)
    (expectEq "unit TimeoutStartSec: readyTimeout + 60" 960 sc.TimeoutStartSec)
    (expect "unit without watchdogSec has no WatchdogSec" (!(sc ? WatchdogSec)) "WatchdogSec is set")
    (expectEq "unit with watchdogSec" 30 readyUnit.serviceConfig.WatchdogSec)
    (expectEq "unit readyTimeout = 0: no start timeout" "infinity"
      readyUnit.serviceConfig.TimeoutStartSec
    )
    (expect "unit readyPattern and readyTimeout reach the launcher"
      (lib.hasSuffix ''"--ready-pattern" "^login: ?$$" "--ready-timeout" "0"'' readyUnit.serviceConfig.ExecStart)
      readyUnit.serviceConfig.ExecStart
    )
    (expectEq "unit User" "every-channel-ipxe-qemu" sc.User)
    (expectEq "unit Group" "kvm" sc.Group)
    (expectEq "unit Restart" "always" sc.Restart)
    (expectEq "unit startLimitIntervalSec" 0 defaultUnit.startLimitIntervalSec)
    (expectEq "unit restartIfChanged" true defaultUnit.restartIfChanged)
    (expectEq "unit wantedBy" [ "multi-user.target" ] defaultUnit.wantedBy)
    (expectEq "unit KillMode" "mixed" sc.KillMode)
    (expectEq "unit DevicePolicy" "closed" sc.DevicePolicy)
    (expectEq "unit DeviceAllow" [
      "/dev/kvm rw"
      "/dev/net/tun rw"
      "/dev/vhost-net rw"
      "char-macvtap rwm"
    ] sc.DeviceAllow)
    (expectEq "unit CapabilityBoundingSet" "" sc.CapabilityBoundingSet)
    (expectEq "unit AmbientCapabilities" "" sc.AmbientCapabilities)
    (expectEq "unit NoNewPrivileges" true sc.NoNewPrivileges)
    (expectEq "unit ProtectSystem" "strict" sc.ProtectSystem)
    (expectEq "unit ProtectHome" true sc.ProtectHome)
    (expectEq "unit PrivateTmp" true sc.PrivateTmp)
    (expectEq "unit StateDirectory" "every-channel/ipxe-qemu" sc.StateDirectory)
    (expect "unit has no RuntimeDirectory (private tap nodes live on /dev, not on the nodev /run)" (
      !(sc ? RuntimeDirectory)
    ) "RuntimeDirectory is back")
    (expectEq "unit UMask" "0077" sc.UMask)
    (expect "unit environment: private tap nodes at ec-macvtap's default (/dev/ec-macvtap)" (
      !(defaultUnit.environment ? EC_MACVTAP_RUNTIME_DIR)
    ) "EC_MACVTAP_RUNTIME_DIR must not point at the nodev /run")
    (expectEq "unit RestartPreventExitStatus: usage errors do not loop" 2 sc.RestartPreventExitStatus)
    (expectEq "unit RestrictAddressFamilies" [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
      "AF_NETLINK"
    ] sc.RestrictAddressFamilies)
    (expect "unit has no PrivateDevices" (!(sc ? PrivateDevices)) "PrivateDevices would hide /dev/tapN")
    (expect "unit has no MemoryDenyWriteExecute" (
      !(sc ? MemoryDenyWriteExecute)
    ) "TCG needs W+X memory")
    (expect "unit without LAN has no ExecStartPre" (!(sc ? ExecStartPre)) "unexpected ExecStartPre")
    (expect "unit without LAN has no ExecStopPost" (!(sc ? ExecStopPost)) "unexpected ExecStopPost")
    (expectEq "user" {
      isSystemUser = true;
      group = "kvm";
      description = "every-channel iPXE/QEMU launcher";
    } (evalConfig [ enabled ]).users.users.every-channel-ipxe-qemu)
    (expectEq "kernel modules without LAN" [
      "tun"
      "vhost_net"
    ] (evalConfig [ enabled ]).boot.kernelModules)
    (expectEq "no tmpfiles below /var/lib" [ ] (evalConfig [ enabled ]).systemd.tmpfiles.rules)
  ]
  ++ hostNetworkingChecks "without LAN" (evalConfig [ enabled ]) null;
in
{
  inherit defaultChecks disabledChecks unitChecks;
}
