# Module-eval, part 4: the exact command lines (ExecStartPre, ExecStart, ExecStopPost) of
# the example hosts and of hand-written configurations, the host-side networking settings
# they bring, and the module's warnings.
{
  lib,
  ec,
  qemu,
  ipxe,
  netbootDir,
  evalConfig,
  with',
  hostNetworkingChecks,
  unitOf,
  failedAssertions,
  expectEq,
  expect,
  sc,
  forge,
  lanDerived,
  lanExplicit,
  httpExtra,
  ...
}:

let
  # Each list element is one argument exactly as it must appear in the unit file.
  line = lib.concatStringsSep " ";
  qemuArgs = [
    ''"--qemu"''
    ''"${qemu}/bin/qemu-system-x86_64"''
    ''"--qemu-img"''
    ''"${qemu}/bin/qemu-img"''
  ];

  # `ec-ipxe-qemu run` with the default state dir and sizing, up to the QEMU paths.
  defaultRunHead = [
    ''"${ec}/bin/ec-ipxe-qemu"''
    ''"run"''
    ''"--state-dir"''
    ''"/var/lib/every-channel/ipxe-qemu"''
    ''"--memory"''
    ''"2048"''
    ''"--cpus"''
    ''"2"''
    ''"--accel"''
    ''"auto"''
  ]
  ++ qemuArgs;

  execChecks = [
    # forge example: user-mode only
    (expectEq "forge ExecStart" (line (
      defaultRunHead
      ++ [
        ''"--disk-size"''
        ''"16G"''
        ''"--ipxe"''
        ''"${ipxe}/ipxe.lkrn"''
        ''"--hostname"''
        ''"ec-publisher"''
        ''"--host-forward"''
        ''"tcp:127.0.0.1:2222-:22"''
        ''"--ready-timeout"''
        ''"900"''
      ]
    )) (unitOf forge).serviceConfig.ExecStart)
    # The default (nixpkgs' HTTPS ipxe.lkrn) is the launcher's fast boot path: --ipxe, whose script gives
    # the boot NIC the user-mode network's fixed addresses instead of waiting for DHCP.
    (expect "the default unit boots boot.ipxePackage's ipxe.lkrn (--ipxe, the fast path)"
      (lib.hasInfix ''"--ipxe" "${ipxe}/ipxe.lkrn"'' sc.ExecStart)
      "the default ExecStart has no --ipxe: ${sc.ExecStart}"
    )
    (expect "forge has no ExecStartPre" (
      !((unitOf forge).serviceConfig ? ExecStartPre)
    ) "user-mode only must not touch host links")
    (expectEq "forge assertions" [ ] (failedAssertions forge))

    # LAN example: derived MAC
    (expectEq "lan (derived MAC) ExecStartPre" (
      "+"
      + line [
        ''"${ec}/bin/ec-macvtap"''
        ''"create"''
        ''"--link"''
        ''"eno1"''
        ''"--name"''
        ''"ec-lan0"''
        ''"--mode"''
        ''"bridge"''
        ''"--owner"''
        ''"every-channel-ipxe-qemu"''
        ''"--replace"''
      ]
    ) (unitOf lanDerived).serviceConfig.ExecStartPre)
    (expectEq "lan (derived MAC) ExecStart" (line (
      defaultRunHead
      ++ [
        ''"--disk-size"''
        ''"32G"''
        ''"--ipxe"''
        ''"${ipxe}/ipxe.lkrn"''
        ''"--lan-interface"''
        ''"ec-lan0"''
        ''"--lan-queues"''
        ''"1"''
        ''"--lan-vhost"''
        ''"auto"''
        ''"--ready-timeout"''
        ''"900"''
      ]
    )) (unitOf lanDerived).serviceConfig.ExecStart)
    (expectEq "lan (derived MAC) ExecStopPost" (
      "+"
      + line [
        ''"${ec}/bin/ec-macvtap"''
        ''"delete"''
        ''"ec-lan0"''
      ]
    ) (unitOf lanDerived).serviceConfig.ExecStopPost)
    (expectEq "lan (derived MAC) waits for its parent" [
      "sys-subsystem-net-devices-eno1.device"
    ] (unitOf lanDerived).wants)
    (expectEq "lan kernel modules" [
      "tun"
      "vhost_net"
      "macvtap"
    ] lanDerived.boot.kernelModules)
    (expectEq "lan (derived MAC) assertions" [ ] (failedAssertions lanDerived))
    (expect "lan (derived MAC) private tap node directory is ec-macvtap's default" (
      !((unitOf lanDerived).environment ? EC_MACVTAP_RUNTIME_DIR)
    ) "EC_MACVTAP_RUNTIME_DIR is set")
    (expectEq "lan (derived MAC) DeviceAllow keeps mknod" "char-macvtap rwm" (
      lib.last (unitOf lanDerived).serviceConfig.DeviceAllow
    ))

    # LAN with explicit MAC, custom disk path and an iPXE URL with % and ${...}
    (expectEq "lan (explicit MAC) ExecStartPre" (
      "+"
      + line [
        ''"${ec}/bin/ec-macvtap"''
        ''"create"''
        ''"--link"''
        ''"eth1"''
        ''"--name"''
        ''"ec-tuners"''
        ''"--mode"''
        ''"private"''
        ''"--mac"''
        ''"52:54:00:EC:00:01"''
        ''"--owner"''
        ''"every-channel-ipxe-qemu"''
        ''"--replace"''
      ]
    ) (unitOf lanExplicit).serviceConfig.ExecStartPre)
    (expectEq "lan (explicit MAC) ExecStart" (line (
      defaultRunHead
      ++ [
        ''"--disk"''
        ''"/srv/ec/publisher.qcow2"''
        ''"--disk-size"''
        ''"32G"''
        ''"--boot-url"''
        ''"https://boot.example.org/ec/netboot.ipxe?mac=$''${net0/mac}&x=100%%"''
        ''"--ipxe"''
        ''"${ipxe}/ipxe.lkrn"''
        ''"--lan-interface"''
        ''"ec-tuners"''
        ''"--lan-nic-model"''
        ''"virtio-net-pci"''
        ''"--lan-queues"''
        ''"2"''
        ''"--lan-vhost"''
        ''"on"''
        ''"--ready-timeout"''
        ''"900"''
      ]
    )) (unitOf lanExplicit).serviceConfig.ExecStart)
    (expectEq "lan (explicit MAC) ExecStopPost" (
      "+"
      + line [
        ''"${ec}/bin/ec-macvtap"''
        ''"delete"''
        ''"ec-tuners"''
      ]
    ) (unitOf lanExplicit).serviceConfig.ExecStopPost)
    (expectEq "lan (explicit MAC) disk outside the state dir is writable" [
      "/srv/ec"
    ] (unitOf lanExplicit).serviceConfig.ReadWritePaths)
    (expectEq "lan (explicit MAC) assertions" [ ] (failedAssertions lanExplicit))

    # boot.http, no disk, no iPXE image, custom state dir, extra args needing escapes
    (expectEq "http+extraArgs ExecStart" (line (
      [
        ''"${ec}/bin/ec-ipxe-qemu"''
        ''"run"''
        ''"--state-dir"''
        ''"/srv/ec-guest"''
        ''"--memory"''
        ''"256"''
        ''"--cpus"''
        ''"1"''
        ''"--accel"''
        ''"tcg"''
      ]
      ++ qemuArgs
      ++ [
        ''"--no-disk"''
        ''"--boot-dir"''
        ''"${netbootDir}"''
        ''"--boot-http-bind"''
        ''"127.0.0.1"''
        ''"--boot-http-port"''
        ''"8080"''
        ''"--dns"''
        ''"9.9.9.9"''
        ''"--dns"''
        ''"149.112.112.112"''
        ''"--boot-nic-model"''
        ''"e1000"''
        ''"--host-forward"''
        ''"tcp::2222-:22"''
        ''"--host-forward"''
        ''"udp:127.0.0.1:5353-:53"''
        ''"--ready-timeout"''
        ''"900"''
        ''"--"''
        ''"-smbios"''
        ''"type=11,value=io.systemd.credential:motd=it's \"quoted\", 100%% $$HOME $''${HOME} back\\slash; semi"''
        ''"-device"''
        ''"virtio-rng-pci"''
        ''""''
      ]
    )) (unitOf httpExtra).serviceConfig.ExecStart)
    (expect "http+extraArgs has no ExecStartPre" (
      !((unitOf httpExtra).serviceConfig ? ExecStartPre)
    ) "no LAN, no macvtap")
    (expectEq "http+extraArgs tmpfiles" [
      "d /srv/ec-guest 0750 every-channel-ipxe-qemu kvm - -"
    ] httpExtra.systemd.tmpfiles.rules)
    (expectEq "http+extraArgs ReadWritePaths" [
      "/srv/ec-guest"
    ] (unitOf httpExtra).serviceConfig.ReadWritePaths)
    (expect "http+extraArgs has no StateDirectory" (
      !((unitOf httpExtra).serviceConfig ? StateDirectory)
    ) "state dir outside /var/lib")
    (expectEq "http+extraArgs assertions" [ ] (failedAssertions httpExtra))
  ]
  ++ hostNetworkingChecks "forge" forge null
  ++ hostNetworkingChecks "lan (derived MAC)" lanDerived "ec-lan0"
  ++ hostNetworkingChecks "lan (explicit MAC)" lanExplicit "ec-tuners";

  # The boot cache: on by default with boot.url (the launcher's own default, so nothing is passed), off
  # as `--boot-cache off`, caFiles as repeated `--boot-ca`; boot.ipxePackage still goes to --ipxe.
  cacheUnit =
    extra:
    (unitOf (evalConfig [
      (with' (
        lib.recursiveUpdate {
          enable = true;
          boot.url = "https://boot.example.org/ec/netboot.ipxe";
        } extra
      ))
    ])).serviceConfig.ExecStart;
  cacheChecks = [
    (expect "boot.cache on by default: no --boot-cache off" (
      !(lib.hasInfix "--boot-cache" (cacheUnit { }))
    ) "ExecStart: ${cacheUnit { }}")
    (expect "boot.cache.enable = false passes --boot-cache off and keeps --ipxe" (
      let
        x = cacheUnit { boot.cache.enable = false; };
      in
      lib.hasInfix ''"--boot-cache" "off"'' x && lib.hasInfix ''"--ipxe" "${ipxe}/ipxe.lkrn"'' x
    ) "ExecStart: ${cacheUnit { boot.cache.enable = false; }}")
    (expect "boot.cache.caFiles become repeated --boot-ca" (lib.hasInfix
      ''"--boot-ca" "/etc/ssl/a.pem" "--boot-ca" "/etc/ssl/b.pem"''
      (cacheUnit {
        boot.cache.caFiles = [
          "/etc/ssl/a.pem"
          "/etc/ssl/b.pem"
        ];
      })
    ) "caFiles not passed")
    (expectEq "boot.cache.enable defaults to false without boot.url" false
      (evalConfig [ (with' { enable = true; }) ]).services.every-channel.ipxe-qemu.boot.cache.enable
    )
    (expectEq "caFiles with the cache off is refused" 1 (
      builtins.length (
        failedAssertions (evalConfig [
          (with' {
            enable = true;
            boot.url = "https://boot.example.org/x.ipxe";
            boot.cache.enable = false;
            boot.cache.caFiles = [ "/etc/ssl/a.pem" ];
          })
        ])
      )
    ))
  ];

  warningChecks = [
    (expectEq "warning: directory without boot.http.enable" 1 (
      builtins.length
        (evalConfig [
          (with' {
            enable = true;
            boot.http.directory = netbootDir;
          })
        ]).warnings
    ))
    (expectEq "no warnings for the forge example" [ ] forge.warnings)
  ];
in
{
  inherit execChecks warningChecks cacheChecks;
}
