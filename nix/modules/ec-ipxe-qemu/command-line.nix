# The command lines of the every-channel-ipxe-qemu unit, as Nix lists (rendered once by the module with
# utils.escapeSystemdExecArgs): ExecStartPre's `ec-macvtap create`, ExecStart's `ec-ipxe-qemu run` and
# ExecStopPost's `ec-macvtap delete`. No user string is ever spliced into shell text.
{
  lib,
  cfg,
  serviceUser,
  defaultDiskPath,
  lanName,
  lanParent,
  mac,
}:

let
  optionalFlag =
    flag: value:
    lib.optionals (value != null) [
      flag
      (toString value)
    ];
  repeatedFlag =
    flag: values:
    lib.concatMap (v: [
      flag
      v
    ]) values;

  macvtapBin = "${cfg.package}/bin/ec-macvtap";

  createArgs = [
    macvtapBin
    "create"
    "--link"
    lanParent
    "--name"
    lanName
    "--mode"
    cfg.lan.macvtap.mode
  ]
  ++ optionalFlag "--mac" mac
  ++ [
    "--owner"
    serviceUser
    "--replace"
  ];

  deleteArgs = [
    macvtapBin
    "delete"
    lanName
  ];

  runArgs = [
    "${cfg.package}/bin/ec-ipxe-qemu"
    "run"
    "--state-dir"
    cfg.stateDir
    "--memory"
    (toString cfg.memory)
    "--cpus"
    (toString cfg.cpus)
    "--accel"
    cfg.accel
    "--qemu"
    "${cfg.qemuPackage}/bin/qemu-system-x86_64"
    "--qemu-img"
    "${cfg.qemuPackage}/bin/qemu-img"
  ]
  ++ (
    if cfg.disk.enable then
      # `--disk` only when the path is not the launcher's own default.
      lib.optionals (cfg.disk.path != defaultDiskPath) [
        "--disk"
        cfg.disk.path
      ]
      ++ [
        "--disk-size"
        cfg.disk.size
      ]
    else
      [ "--no-disk" ]
  )
  ++ optionalFlag "--boot-url" cfg.boot.url
  ++ lib.optionals cfg.boot.http.enable (
    [
      "--boot-dir"
      "${cfg.boot.http.directory}"
    ]
    ++ optionalFlag "--boot-http-bind" cfg.boot.http.bindAddress
    ++ optionalFlag "--boot-http-port" cfg.boot.http.port
  )
  # The boot cache is the launcher's default for an http(s) boot.url (it stays off by itself for a URL it
  # cannot serve, e.g. one with iPXE settings): only "off" is passed.
  ++ lib.optionals (cfg.boot.url != null && !cfg.boot.cache.enable) [
    "--boot-cache"
    "off"
  ]
  ++ repeatedFlag "--boot-ca" (map toString cfg.boot.cache.caFiles)
  ++ lib.optionals (cfg.boot.ipxePackage != null) [
    "--ipxe"
    "${cfg.boot.ipxePackage}/ipxe.lkrn"
  ]
  ++ repeatedFlag "--dns" cfg.boot.userNet.dnsServers
  ++ optionalFlag "--hostname" cfg.boot.userNet.hostname
  ++ optionalFlag "--boot-nic-model" cfg.boot.userNet.model
  ++ repeatedFlag "--host-forward" cfg.boot.userNet.hostForwards
  ++ lib.optionals cfg.lan.enable (
    [
      "--lan-interface"
      lanName
    ]
    ++ optionalFlag "--lan-nic-model" cfg.lan.model
    ++ [
      "--lan-queues"
      (toString cfg.lan.macvtap.queues)
      "--lan-vhost"
      cfg.lan.vhost
    ]
  )
  ++ optionalFlag "--ready-pattern" cfg.boot.readyPattern
  ++ [
    "--ready-timeout"
    (toString cfg.boot.readyTimeout)
  ]
  ++ lib.optionals (cfg.extraArgs != [ ]) ([ "--" ] ++ cfg.extraArgs);

in
{
  inherit createArgs deleteArgs runArgs;
}
