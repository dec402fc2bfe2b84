# Evaluation test of nix/modules/ec-ipxe-qemu.nix and nix/modules/ec-publisher-guest.nix
# against the REAL NixOS code (see ./nixos.nix): the real `systemd.services` and
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
#   nix-instantiate --eval --strict -E 'import nix/tests/module-eval.nix { nixpkgs = /path/to/kit; }'
{
  nixpkgs,
  systemdVersion ? "258",
}:

let
  nixos = import ./nixos.nix { inherit nixpkgs systemdVersion; };
  inherit (nixos) lib;

  fakePkgs = nixos.pkgs;
  ec = fakePkgs.ec-ipxe-qemu.outPath;
  qemu = fakePkgs.qemu_kvm.outPath;
  ipxe = fakePkgs.ipxe.outPath;
  netbootDir = "/nix/store/44444444444444444444444444444444-ec-publisher-netboot";

  evalConfig = modules: (nixos.eval ([ ../modules/ec-ipxe-qemu.nix ] ++ modules)).config;

  opt = [
    "services"
    "every-channel"
    "ipxe-qemu"
  ];
  enabled = lib.setAttrByPath opt { enable = true; };
  with' = attrs: lib.setAttrByPath opt attrs;

  # The settings of each networkd .network (forcing the whole submodule would hit its
  # deprecated-option throws).
  networksOf =
    config:
    lib.mapAttrs (_: n: {
      inherit (n) matchConfig linkConfig;
    }) config.systemd.network.networks;

  unitOf = config: config.systemd.services.every-channel-ipxe-qemu;
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  show = v: if builtins.isString v then v else builtins.toJSON v;
  fail = name: msg: throw "module-eval FAILED: ${name}: ${msg}";
  expectEq =
    name: expected: actual:
    if expected == actual then
      name
    else
      fail name "\n  expected: ${show expected}\n  actual:   ${show actual}";
  expect =
    name: cond: msg:
    if cond then name else fail name msg;

  # ---------------------------------------------------------------- defaults
  defaultCfg = lib.getAttrFromPath opt (evalConfig [ enabled ]);
  defaultUnit = unitOf (evalConfig [ enabled ]);
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

  disabledConfig = evalConfig [ ];
  disabledChecks = [
    (expect "disabled: no unit" (
      !(disabledConfig.systemd.services ? every-channel-ipxe-qemu)
    ) "the unit exists although enable = false")
    (expect "disabled: no user" (
      !(lib.attrByPath [ "users" "users" ] { } disabledConfig ? every-channel-ipxe-qemu)
    ) "the user exists although enable = false")
    (expectEq "disabled: no assertions of ours" [ ] (failedAssertions disabledConfig))
    (expectEq "disabled: no dhcpcd deny" [ ] (
      lib.attrByPath [ "networking" "dhcpcd" "denyInterfaces" ] [ ] disabledConfig
    ))
    (expectEq "disabled: no networkd network" { } disabledConfig.systemd.network.networks)
    (expectEq "disabled: no NetworkManager unmanaged" [ ] (
      lib.attrByPath [ "networking" "networkmanager" "unmanaged" ] [ ] disabledConfig
    ))
  ];

  sc = defaultUnit.serviceConfig;
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
    (expectEq "no dhcpcd deny without LAN" [ ] (
      lib.attrByPath [ "networking" "dhcpcd" "denyInterfaces" ] [ ] (evalConfig [ enabled ])
    ))
    (expectEq "no networkd network without LAN" { } (evalConfig [ enabled ]).systemd.network.networks)
    (expectEq "no NetworkManager unmanaged without LAN" [ ] (
      lib.attrByPath [ "networking" "networkmanager" "unmanaged" ] [ ] (evalConfig [ enabled ])
    ))
  ];

  # ---------------------------------------------------------------- assertions
  # A one-character string from a Unicode code point (Nix has no \v, \f or \u escapes).
  fromCodePoint = cp: builtins.fromJSON ''"\u${lib.fixedWidthString 4 "0" (lib.toHexString cp)}"'';
  withCredentials =
    credentials:
    with' {
      enable = true;
      inherit credentials;
    };
  lanOn =
    extra:
    with' (
      {
        enable = true;
        lan.enable = true;
        lan.macvtap.interface = "eth0";
      }
      // extra
    );
  assertionCases = {
    "lan.enable without interface" = {
      def = with' {
        enable = true;
        lan.enable = true;
      };
      says = "lan.macvtap.interface is not set";
    };
    "macvtap name over 15 bytes" = {
      def = lanOn { lan.macvtap.name = "ec-lan0-far-too-long"; };
      says = "is 20 bytes long; Linux allows at most 15";
    };
    "macvtap name with slash" = {
      def = lanOn { lan.macvtap.name = "ec/lan0"; };
      says = "contains '/'";
    };
    "macvtap name with whitespace" = {
      def = lanOn { lan.macvtap.name = "ec lan0"; };
      says = "contains whitespace";
    };
    "macvtap name with tab" = {
      def = lanOn { lan.macvtap.name = "ec\tlan0"; };
      says = "contains whitespace";
    };
    "macvtap name with vertical tab" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 11}lan0"; };
      says = "contains whitespace";
    };
    "macvtap name with no-break space" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 160}lan0"; };
      says = "contains whitespace";
    };
    "macvtap name with ideographic space" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 12288}l0"; };
      says = "contains whitespace";
    };
    "macvtap name with colon" = {
      def = lanOn { lan.macvtap.name = "ec:lan0"; };
      says = "contains ':'";
    };
    "macvtap name with a C0 control character" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 1}lan0"; };
      says = "contains a control character";
    };
    "macvtap name with DEL" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 127}lan0"; };
      says = "contains a control character";
    };
    "macvtap name with a C1 control character" = {
      def = lanOn { lan.macvtap.name = "ec${fromCodePoint 144}lan0"; };
      says = "contains a control character";
    };
    "macvtap name empty" = {
      def = lanOn { lan.macvtap.name = ""; };
      says = "is empty";
    };
    "macvtap name dot-dot" = {
      def = lanOn { lan.macvtap.name = ".."; };
      says = "is '.' or '..'";
    };
    "parent interface name invalid" = {
      def = lanOn { lan.macvtap.interface = "eno1 "; };
      says = ''lan.macvtap.interface = "eno1 " contains whitespace'';
    };
    "parent interface name with colon" = {
      def = lanOn { lan.macvtap.interface = "eth0:1"; };
      says = "lan.macvtap.interface = \"eth0:1\" contains ':'";
    };
    "multicast MAC" = {
      def = lanOn { lan.macvtap.macAddress = "01:00:5e:00:00:fb"; };
      says = "is a multicast";
    };
    "all-zero MAC" = {
      def = lanOn { lan.macvtap.macAddress = "00:00:00:00:00:00"; };
      says = "must not be all zero";
    };
    "boot.http without directory" = {
      def = with' {
        enable = true;
        boot.http.enable = true;
      };
      says = "boot.http.directory is null";
    };
    "readyPattern empty" = {
      def = with' {
        enable = true;
        boot.readyPattern = "";
      };
      says = "is empty";
    };
    "readyPattern with an open parenthesis" = {
      def = with' {
        enable = true;
        boot.readyPattern = "(ready";
      };
      says = "has a '(' without its ')'";
    };
    "readyPattern with a stray parenthesis" = {
      def = with' {
        enable = true;
        boot.readyPattern = "ready)";
      };
      says = "has a ')' without its '('";
    };
    "readyPattern with an open bracket" = {
      def = with' {
        enable = true;
        boot.readyPattern = "[a-z";
      };
      says = "has a '[' without its ']'";
    };
    "readyPattern ending in a backslash" = {
      def = with' {
        enable = true;
        boot.readyPattern = "ready\\";
      };
      says = "ends with a lone backslash";
    };
    "stateDir too long for the console socket" = {
      def = with' {
        enable = true;
        stateDir = "/var/lib/${lib.fixedWidthString 90 "x" ""}";
      };
      says = "the console socket";
    };
    "lan.vhost on with a LAN NIC that is not virtio" = {
      def = with' {
        enable = true;
        lan = {
          enable = true;
          macvtap.interface = "eth0";
          vhost = "on";
          model = "e1000";
        };
      };
      says = ''lan.vhost = "on" needs a virtio-net LAN NIC'';
    };
    "boot.url and boot.http together" = {
      def = with' {
        enable = true;
        boot.url = "http://10.0.2.2/x.ipxe";
        boot.http = {
          enable = true;
          directory = netbootDir;
        };
      };
      says = "are both set";
    };
    "a secret credential in the Nix store" = {
      def = withCredentials { mesh-key.file = "${netbootDir}/key"; };
      says = ''credentials.mesh-key.file = "${netbootDir}/key" is in the Nix store'';
    };
    "a secret credential that is the store itself" = {
      def = withCredentials { mesh-key.file = "/nix/store"; };
      says = "is in the Nix store";
    };
  }
  //
    lib.mapAttrs'
      (
        name: says:
        lib.nameValuePair "credential name ${builtins.toJSON name}" {
          def = withCredentials { ${name}.file = "/run/keys/x"; };
          says = "credentials.${lib.strings.escapeNixIdentifier name}: the credential name ${says}";
        }
      )
      {
        "" = "is empty";
        "." = "is '.' or '..'";
        ".." = "is '.' or '..'";
        "ec/tuners" = "contains '/'";
        "ec:tuners" = "contains ':'";
        "ec\ttuners" = "contains a character that is not printable ASCII";
        "ec${fromCodePoint 127}" = "contains a character that is not printable ASCII";
        "tuners-é" = "contains a character that is not printable ASCII";
        "${lib.fixedWidthString 29 "x" ""}" =
          "is 29 bytes long; QEMU's fw_cfg name opt/io.systemd.credentials/NAME allows a NAME of at most 28";
        "ec%n" = "contains '%' or a backslash";
        "ec\\n" = "contains '%' or a backslash";
        " ec" = "begins or ends with a space";
        "ec " = "begins or ends with a space";
      };
  assertionChecks =
    lib.mapAttrsToList (
      name: case:
      let
        failed = failedAssertions (evalConfig [ case.def ]);
      in
      expect "assertion fires: ${name}"
        (
          builtins.length failed == 1
          && lib.hasInfix case.says (builtins.head failed)
          # every message starts with the full option path (the `opt` prefix)
          && lib.hasPrefix "services.every-channel.ipxe-qemu." (builtins.head failed)
        )
        "expected exactly one failed assertion naming the option and mentioning '${case.says}', got ${builtins.toJSON failed}"
    ) assertionCases
    ++ [
      # 'f' and 'v' are letters, not the escapes "\f" and "\v" (which Nix does not have)
      (expectEq "readyPatterns with escaped and bracketed parentheses pass" [ ] (
        failedAssertions (evalConfig [
          (with' {
            enable = true;
            boot.readyPattern = "^(ec-publisher: ready|[)(]\\)\\(x)$";
          })
        ])
      ))
      (expectEq "a []] class passes" [ ] (
        failedAssertions (evalConfig [
          (with' {
            enable = true;
            boot.readyPattern = "[]a]+ ready";
          })
        ])
      ))
      (expectEq "names with f and v pass the interface-name rule" [ ] (
        failedAssertions (evalConfig [
          (lanOn {
            lan.macvtap.interface = "enp0s31f6";
            lan.macvtap.name = "ec-veth0";
          })
        ])
      ))
    ];

  # ---------------------------------------------------------------- types
  # [ option path (below services.every-channel.ipxe-qemu), value ]
  rejected = [
    [
      "enable"
      "yes"
    ]
    [
      "memory"
      0
    ]
    [
      "memory"
      "2048"
    ]
    [
      "memory"
      (-512)
    ]
    [
      "cpus"
      0
    ]
    [
      "accel"
      "hvf"
    ]
    [
      "stateDir"
      "var/lib/ec"
    ]
    [
      "stateDir"
      "/var/lib/ec guest"
    ]
    [
      "disk.path"
      "disk.qcow2"
    ]
    [
      "disk.size"
      "lots"
    ]
    [
      "disk.size"
      "0G"
    ]
    [
      "boot.userNet.dnsServers"
      "9.9.9.9"
    ]
    [
      "boot.http.port"
      70000
    ]
    [
      "lan.macvtap.mode"
      "bridged"
    ]
    [
      "lan.macvtap.macAddress"
      "52:54:00:ec:00"
    ]
    [
      "lan.macvtap.macAddress"
      "52-54-00-ec-00-01"
    ]
    [
      "lan.macvtap.macAddress"
      "52:54:00:ec:00:0g"
    ]
    [
      "lan.macvtap.macAddress"
      42
    ]
    [
      "lan.macvtap.queues"
      0
    ]
    [
      "lan.vhost"
      "yes"
    ]
    [
      "lan.vhost"
      true
    ]
    [
      "extraArgs"
      "-snapshot"
    ]
    [
      "credentials.key.file"
      ./module-eval.nix
    ]
    [
      "credentials.key.file"
      "run/keys/key"
    ]
    [
      "credentials.key.file"
      "/run/keys/a key"
    ]
    [
      "credentials.key.file"
      "/run/keys/%n"
    ]
    [
      "credentials.key.secret"
      "no"
    ]
    [
      "memory"
      63
    ]
    [
      "memory"
      1048577
    ]
    [
      "cpus"
      256
    ]
    [
      "lan.macvtap.queues"
      17
    ]
    [
      "disk.size"
      "100K"
    ]
    [
      "disk.size"
      "1023K"
    ]
    [
      "disk.size"
      "1048575"
    ]
    [
      "disk.size"
      "0"
    ]
    [
      "disk.size"
      "65T"
    ]
    [
      "disk.size"
      "70368744177665"
    ]
    [
      "disk.size"
      "99999999999999999999999"
    ]
    [
      "disk.size"
      "99999999999999999999999T"
    ]
    [
      "disk.size"
      "1.5G"
    ]
    [
      "disk.size"
      "8X"
    ]
    [
      "disk.size"
      "8GB"
    ]
    [
      "disk.size"
      "G"
    ]
    [
      "disk.size"
      ""
    ]
    [
      "disk.size"
      "-1G"
    ]
    [
      "disk.size"
      "8 G"
    ]
    [
      "disk.size"
      8
    ]
  ];
  accepted = [
    [
      "memory"
      256
    ]
    [
      "accel"
      "tcg"
    ]
    [
      "stateDir"
      "/srv/ec"
    ]
    [
      "disk.size"
      "100G"
    ]
    [
      "boot.http.port"
      8080
    ]
    [
      "lan.macvtap.mode"
      "passthru"
    ]
    [
      "lan.macvtap.macAddress"
      "52:54:00:EC:00:01"
    ]
    [
      "lan.macvtap.queues"
      4
    ]
    [
      "memory"
      64
    ]
    [
      "memory"
      1048576
    ]
    [
      "cpus"
      1
    ]
    [
      "cpus"
      255
    ]
    [
      "lan.macvtap.queues"
      1
    ]
    [
      "lan.macvtap.queues"
      16
    ]
    [
      "disk.size"
      "1M"
    ]
    [
      "disk.size"
      "1024K"
    ]
    [
      "disk.size"
      "1048576"
    ]
    [
      "disk.size"
      "1048576B"
    ]
    [
      "disk.size"
      "512MiB"
    ]
    [
      "disk.size"
      "8gib"
    ]
    [
      "disk.size"
      "2t"
    ]
    [
      "disk.size"
      "64T"
    ]
    [
      "disk.size"
      "70368744177664"
    ]
    [
      "disk.size"
      "008G"
    ]
  ];
  tryOption =
    entry:
    let
      path = opt ++ lib.splitString "." (builtins.elemAt entry 0);
      value = builtins.elemAt entry 1;
      config = evalConfig [
        enabled
        (lib.setAttrByPath path value)
      ];
      forced = lib.getAttrFromPath path config;
    in
    (builtins.tryEval (builtins.deepSeq forced forced)).success;
  typeChecks =
    map (
      entry:
      expect "type rejects ${builtins.elemAt entry 0} = ${builtins.toJSON (builtins.elemAt entry 1)}" (
        !(tryOption entry)
      ) "the definition was accepted"
    ) rejected
    ++ map (
      entry:
      expect "type accepts ${builtins.elemAt entry 0} = ${builtins.toJSON (builtins.elemAt entry 1)}"
        (tryOption entry)
        "the definition was rejected"
    ) accepted;

  # ---------------------------------------------------------------- command lines
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

  forge = evalConfig [ ../examples/forge-host.nix ];
  lanDerived = evalConfig [ ../examples/lan-host.nix ];
  lanExplicit = evalConfig [
    ../examples/lan-host.nix
    (with' {
      lan.macvtap = {
        interface = lib.mkForce "eth1";
        name = "ec-tuners";
        mode = "private";
        macAddress = "52:54:00:EC:00:01";
        queues = 2;
      };
      lan.model = "virtio-net-pci";
      lan.vhost = "on";
      disk.path = "/srv/ec/publisher.qcow2";
      boot.url = "https://boot.example.org/ec/netboot.ipxe?mac=\${net0/mac}&x=100%";
    })
  ];
  httpExtra = evalConfig [
    (with' {
      enable = true;
      stateDir = "/srv/ec-guest";
      memory = 256;
      cpus = 1;
      accel = "tcg";
      disk.enable = false;
      boot.ipxePackage = null;
      boot.http = {
        enable = true;
        directory = netbootDir;
        bindAddress = "127.0.0.1";
        port = 8080;
      };
      boot.userNet = {
        dnsServers = [
          "9.9.9.9"
          "149.112.112.112"
        ];
        model = "e1000";
        hostForwards = [
          "tcp::2222-:22"
          "udp:127.0.0.1:5353-:53"
        ];
      };
      extraArgs = [
        "-smbios"
        "type=11,value=io.systemd.credential:motd=it's \"quoted\", 100% $HOME \${HOME} back\\slash; semi"
        "-device"
        "virtio-rng-pci"
        ""
      ];
    })
  ];

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
    (expectEq "forge leaves dhcpcd alone" [ ] (
      lib.attrByPath [ "networking" "dhcpcd" "denyInterfaces" ] [ ] forge
    ))
    (expectEq "forge leaves networkd alone" { } forge.systemd.network.networks)
    (expectEq "forge leaves NetworkManager alone" [ ] (
      lib.attrByPath [ "networking" "networkmanager" "unmanaged" ] [ ] forge
    ))

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
    (expectEq "lan (derived MAC) dhcpcd leaves the macvtap alone" [
      "ec-lan0"
    ] (lib.attrByPath [ "networking" "dhcpcd" "denyInterfaces" ] [ ] lanDerived))
    (expectEq "lan (derived MAC) networkd leaves the macvtap alone" {
      "05-every-channel-macvtap" = {
        matchConfig.Name = "ec-lan0";
        linkConfig.Unmanaged = true;
      };
    } (networksOf lanDerived))
    (expectEq "lan (derived MAC) NetworkManager leaves the macvtap alone" [
      "interface-name:ec-lan0"
    ] (lib.attrByPath [ "networking" "networkmanager" "unmanaged" ] [ ] lanDerived))
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
    (expectEq "lan (explicit MAC) dhcpcd leaves the macvtap alone" [
      "ec-tuners"
    ] (lib.attrByPath [ "networking" "dhcpcd" "denyInterfaces" ] [ ] lanExplicit))
    (expectEq "lan (explicit MAC) networkd leaves the macvtap alone" {
      "05-every-channel-macvtap" = {
        matchConfig.Name = "ec-tuners";
        linkConfig.Unmanaged = true;
      };
    } (networksOf lanExplicit))
    (expectEq "lan (explicit MAC) NetworkManager leaves the macvtap alone" [
      "interface-name:ec-tuners"
    ] (lib.attrByPath [ "networking" "networkmanager" "unmanaged" ] [ ] lanExplicit))

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

  # ---------------------------------------------------------------- rendered unit text
  # What NixOS writes to /etc/systemd/system, from the real systemd-lib.nix.
  textOf = config: config.systemd.units."every-channel-ipxe-qemu.service".text;
  linesOf = text: lib.filter (l: l != "") (lib.splitString "\n" text);
  # The lines of one [Section] of a unit file.
  sectionOf =
    name: text:
    let
      go =
        acc: l:
        if lib.hasPrefix "[" l then
          acc // { current = l; }
        else if acc.current == "[${name}]" then
          acc // { lines = acc.lines ++ [ l ]; }
        else
          acc;
    in
    (lib.foldl' go {
      current = null;
      lines = [ ];
    } (linesOf text)).lines;
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
  # Credentials: one secret outside the store, one non-secret store file, and the longest
  # name QEMU's fw_cfg takes (28 bytes).
  tunersFile = "/nix/store/55555555555555555555555555555555-ec-tuners";
  longName = lib.fixedWidthString 28 "x" "";
  credentialsConfig = evalConfig [
    (withCredentials {
      "ec.tuners" = {
        file = tunersFile;
        secret = false;
      };
      mesh-key.file = "/run/keys/ec-mesh-key";
      ${longName}.file = "/run/keys/long";
    })
  ];
  credentialChecks = [
    (expectEq "credentials: no failed assertions" [ ] (failedAssertions credentialsConfig))
    (expectEq "credentials: LoadCredential=NAME:FILE, one line each" [
      "LoadCredential=ec.tuners:${tunersFile}"
      "LoadCredential=mesh-key:/run/keys/ec-mesh-key"
      "LoadCredential=${longName}:/run/keys/long"
    ] (lib.filter (lib.hasPrefix "LoadCredential=") (sectionOf "Service" (textOf credentialsConfig))))
    (expectEq "credentials: the launcher's command line is unchanged (it reads $CREDENTIALS_DIRECTORY)"
      sc.ExecStart
      (unitOf credentialsConfig).serviceConfig.ExecStart
    )
    (expect "no credentials: no LoadCredential= line" (
      !(lib.any (lib.hasPrefix "LoadCredential") (linesOf (textOf (evalConfig [ enabled ]))))
    ) (textOf (evalConfig [ enabled ])))
    (expectEq "credentials default to secret" true
      (lib.getAttrFromPath opt credentialsConfig).credentials.mesh-key.secret
    )
    # the rule the launcher shares, checked directly
    (expectEq "validate.nix: credential names" [ null null null "is empty" "is '.' or '..'" ] (
      map validate.credentialNameProblem [
        "ec.tuners"
        longName
        "a b"
        ""
        ".."
      ]
    ))
    (expectEq "validate.nix: a 29-byte credential name is too long for fw_cfg"
      "is 29 bytes long; QEMU's fw_cfg name opt/io.systemd.credentials/NAME allows a NAME of at most 28"
      (validate.credentialNameProblem "${longName}x")
    )
    (expectEq "validate.nix: a space inside a name is systemd's, outside it is the unit file's"
      [
        null
        "begins or ends with a space, which the unit file would drop"
      ]
      (
        map validate.loadCredentialNameProblem [
          "a b"
          "ab "
        ]
      )
    )
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

  # ---------------------------------------------------------------- refusal table
  # tests/data/refusals.json: the same values go to the launcher in tests/refusals.rs.
  refusalTable = builtins.fromJSON (builtins.readFile ../../tests/data/refusals.json);
  refusedByModule =
    case:
    let
      settings = (case.context or { }) // {
        ${case.option} = case.value;
      };
      def = lib.foldl' (
        acc: path: lib.recursiveUpdate acc (lib.setAttrByPath (lib.splitString "." path) settings.${path})
      ) { enable = true; } (lib.attrNames settings);
      config = evalConfig [ (with' def) ];
      r = builtins.tryEval (builtins.deepSeq (textOf config) (failedAssertions config));
    in
    {
      refused = !(r.success && r.value == [ ]);
      # the failed assertions' messages (none when a type refused the value)
      messages = if r.success then r.value else [ ];
    };
  refusalChecks = map (
    case:
    let
      got = refusedByModule case;
    in
    expect
      "refusal table: ${case.option} = ${builtins.toJSON case.value} is ${
        if case.refused then "refused" else "accepted"
      }"
      (
        got.refused == case.refused
        && lib.all (lib.hasPrefix "services.every-channel.ipxe-qemu.") got.messages
      )
      "the module ${
        if got.refused then "refused" else "accepted"
      } it, with ${builtins.toJSON got.messages}"
  ) refusalTable.cases;
  refusedBadValues = lib.filter (c: c.refused) refusalTable.cases;

  # The same table against nix/lib/validate.nix directly, without the module: for each
  # option a validator covers, the value is accepted exactly when the table says so. The
  # other options (ranges, enums, rules across options) are the module's types and
  # assertions, checked above.
  validate = import ../lib/validate.nix { inherit lib; };
  noProblem = problemOf: v: problemOf v == null;
  absolute = v: builtins.match validate.absolutePathRegex v != null;
  validatorOf = {
    "stateDir" = v: absolute v && validate.stateDirProblem v == null;
    "disk.path" = v: absolute v && validate.diskPathProblem v == null;
    "disk.size" = validate.isDiskSize;
    "boot.url" = noProblem validate.bootUrlProblem;
    "boot.readyPattern" = noProblem validate.readyPatternProblem;
    "boot.http.bindAddress" = validate.isIPv4;
    "boot.userNet.dnsServers" = lib.all validate.isIPAddress;
    "boot.userNet.hostForwards" = lib.all validate.isHostForward;
    "boot.userNet.hostname" = validate.isHostname;
    "boot.userNet.model" = validate.isNicModel;
    "lan.model" = validate.isNicModel;
    "lan.macvtap.name" = noProblem validate.ifNameProblem;
  };
  coveredCases = lib.filter (c: validatorOf ? ${c.option}) refusalTable.cases;
  validatorChecks =
    map (
      case:
      let
        accepted = validatorOf.${case.option} case.value;
      in
      expect "validate.nix: ${case.option} = ${builtins.toJSON case.value} is ${
        if case.refused then "refused" else "accepted"
      }" (accepted != case.refused) "validate.nix ${if accepted then "accepted" else "refused"} it"
    ) coveredCases
    ++ [
      (expect "validate.nix covers every option of the table it can" (lib.all (
        o: lib.any (c: c.option == o) refusalTable.cases
      ) (lib.attrNames validatorOf)) "an option of validatorOf has no case in tests/data/refusals.json")
    ];

  # ---------------------------------------------------------------- the guest module
  guestEval =
    modules:
    (nixos.eval (
      [
        ../modules/ec-publisher-guest.nix
      ]
      ++ modules
    )).config;
  guestOn = extra: {
    every-channel.publisherGuest = {
      enable = true;
    }
    // extra;
  };
  guest = guestEval [
    (guestOn {
      dataDisk.enable = true;
      sshAuthorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly admin@forge" ];
    })
  ];
  guestMinimal = guestEval [ (guestOn { tunerDiscovery.enable = false; }) ];
  guestOff = guestEval [ ];
  netUnit = config: name: config.systemd.network.units.${name}.text;
  guestService = config: name: config.systemd.units."${name}.service".text;
  sectionHas =
    name: section: line: text:
    expect "guest ${name}: [${section}] has ${line}" (lib.elem line (
      sectionOf section text
    )) "missing in:\n${text}";
  guestRejects =
    what: def:
    expect "guest type rejects ${what}" (
      !(builtins.tryEval (
        builtins.deepSeq (guestEval [ (guestOn def) ]).every-channel.publisherGuest true
      )).success
    ) "the definition was accepted";
  guestChecks = [
    (expectEq "guest assertions" [ ] (failedAssertions guest))
    (sectionHas "10-ec-boot0.link" "Match" "Path=pci-0000:00:03.0" (netUnit guest "10-ec-boot0.link"))
    (sectionHas "10-ec-boot0.link" "Link" "Name=boot0" (netUnit guest "10-ec-boot0.link"))
    (sectionHas "10-ec-lan0.link" "Match" "Path=pci-0000:00:04.0" (netUnit guest "10-ec-lan0.link"))
    (sectionHas "10-ec-lan0.link" "Link" "Name=lan0" (netUnit guest "10-ec-lan0.link"))
    (sectionHas "10-ec-boot0.network" "Match" "Name=boot0" (netUnit guest "10-ec-boot0.network"))
    (sectionHas "10-ec-boot0.network" "Network" "DHCP=yes" (netUnit guest "10-ec-boot0.network"))
    (sectionHas "10-ec-boot0.network" "DHCPv4" "RouteMetric=100" (netUnit guest "10-ec-boot0.network"))
    (sectionHas "10-ec-boot0.network" "Link" "RequiredForOnline=routable" (
      netUnit guest "10-ec-boot0.network"
    ))
    (sectionHas "10-ec-lan0.network" "Network" "DHCP=ipv4" (netUnit guest "10-ec-lan0.network"))
    (sectionHas "10-ec-lan0.network" "Network" "LinkLocalAddressing=no" (
      netUnit guest "10-ec-lan0.network"
    ))
    (sectionHas "10-ec-lan0.network" "DHCPv4" "RouteMetric=1024" (netUnit guest "10-ec-lan0.network"))
    (sectionHas "10-ec-lan0.network" "Link" "RequiredForOnline=no" (netUnit guest "10-ec-lan0.network"))
    (sectionHas "tuner discovery" "Service" "Type=oneshot" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Service" "StandardOutput=journal+console" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Service" "DynamicUser=true" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Unit" "Wants=network-online.target" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "tuner discovery" "Install" "WantedBy=multi-user.target" (
      guestService guest "every-channel-tuner-discovery"
    ))
    (sectionHas "ready line" "Unit" "After=multi-user.target" (
      guestService guest "every-channel-publisher-ready"
    ))
    (sectionHas "ready line" "Install" "WantedBy=multi-user.target" (
      guestService guest "every-channel-publisher-ready"
    ))
    (sectionHas "ready line" "Service" "StandardOutput=tty" (
      guestService guest "every-channel-publisher-ready"
    ))
    (sectionHas "ready line" "Service" "TTYPath=/dev/ttyS0" (
      guestService guest "every-channel-publisher-ready"
    ))
    (
      let
        text = guest.systemd.services.every-channel-publisher-ready.serviceConfig.ExecStart.text;
        lan = lib.strings.splitString "ec-publisher: lan " text;
        ready = lib.strings.splitString "ec-publisher: ready" text;
      in
      expect "guest ready script prints the LAN address before the ready line" (
        builtins.length lan == 2
        && builtins.length ready == 2
        && lib.hasInfix "ec-publisher: ready" (builtins.elemAt lan 1)
      ) text
    )
    (expect "guest ready and discovery units run the files the Debian test guest runs" (
      lib.hasSuffix (builtins.readFile ../guest/ec-publisher-ready.sh) guest.systemd.services.every-channel-publisher-ready.serviceConfig.ExecStart.text
      && lib.hasSuffix (builtins.readFile ../guest/ec-publisher-discover.sh) guest.systemd.services.every-channel-tuner-discovery.serviceConfig.ExecStart.text
      && lib.hasInfix "EC_TUNER_ATTEMPTS=12\n" guest.systemd.services.every-channel-tuner-discovery.serviceConfig.ExecStart.text
    ) "nix/guest/*.sh is not what the units run")
    (expect "guest ready line also without LAN or tuner discovery" (
      guestMinimal.systemd.units ? "every-channel-publisher-ready.service"
    ) "unit missing")
    (sectionHas "data disk format" "Unit" "DefaultDependencies=false" (
      guestService guest "every-channel-data-disk-format"
    ))
    (sectionHas "data disk format" "Unit" "Requires=dev-vda.device" (
      guestService guest "every-channel-data-disk-format"
    ))
    (expectEq "guest data disk mount" {
      device = "/dev/vda";
      fsType = "ext4";
      options = [
        "nofail"
        "x-systemd.requires=every-channel-data-disk-format.service"
        "x-systemd.device-timeout=60s"
      ];
    } guest.fileSystems."/var/lib/every-channel")
    (expectEq "guest serial console" [
      "console=tty0"
      "console=ttyS0,115200n8"
    ] guest.boot.kernelParams)
    (expect "guest initrd has the virtio drivers" (lib.all
      (m: lib.elem m guest.boot.initrd.availableKernelModules)
      [
        "virtio_pci"
        "virtio_net"
        "virtio_blk"
      ]
    ) "missing in ${builtins.toJSON guest.boot.initrd.availableKernelModules}")
    (expectEq "guest ssh is key-only" false guest.services.openssh.settings.PasswordAuthentication)
    (expectEq "guest firewall lets tuner replies in on lan0"
      "iptables -w -I nixos-fw -i lan0 -p udp --sport 65001 -j nixos-fw-accept"
      guest.networking.firewall.extraCommands
    )
    (expectEq "guest firewall (nftables)" ''iifname "lan0" udp sport 65001 accept''
      (guestEval [
        (guestOn { })
        { networking.nftables.enable = true; }
      ]).networking.firewall.extraInputRules
    )
    (expect "guest without tuner discovery has no discovery unit" (
      !(guestMinimal.systemd.units ? "every-channel-tuner-discovery.service")
    ) "unit present")
    (expect "guest without data disk has no format unit" (
      !(guestMinimal.systemd.units ? "every-channel-data-disk-format.service")
    ) "unit present")
    (expectEq "guest without ssh keys leaves openssh alone" { } guestMinimal.services.openssh)
    (expect "guest disabled: no units, links or networks" (
      !(guestOff.systemd.units ? "every-channel-tuner-discovery.service")
      && guestOff.systemd.network.units == { }
    ) "something is defined although enable = false")
    (guestRejects "dataDisk.device = \"vda\"" { dataDisk.device = "vda"; })
    (guestRejects "dataDisk.label longer than 16" { dataDisk.label = "a-label-far-too-long"; })
    (guestRejects "dataDisk.mountPoint relative" { dataDisk.mountPoint = "var/lib/ec"; })
    (guestRejects "tunerDiscovery.attempts = 0" { tunerDiscovery.attempts = 0; })
  ];

  # ---------------------------------------------------------------- doctor wrapper
  # `every-channel-ipxe-qemu-doctor` must run exactly the unit's ExecStart argv with
  # `doctor` for `run`, as the unit's user. The unit's argv is read back from the rendered
  # ExecStart (escapeSystemdExecArgs: JSON strings with % and $ doubled), so the check does
  # not trust the module's own list.
  doctorOf =
    config:
    lib.findFirst (
      p: (p.name or "") == "every-channel-ipxe-qemu-doctor"
    ) null config.environment.systemPackages;
  execArgv =
    execStart:
    builtins.fromJSON (
      "[" + lib.replaceStrings [ "\" \"" "%%" "$$" ] [ "\",\"" "%" "$" ] execStart + "]"
    );
  doctorChecksFor =
    name: config:
    let
      wrapper = doctorOf config;
      argv = execArgv (unitOf config).serviceConfig.ExecStart;
      text = if wrapper == null then "" else wrapper.text;
      doctorLine = "doctor=(${
        lib.escapeShellArgs [
          "${ec}/bin/ec-ipxe-qemu"
          "doctor"
        ]
      } \"$@\" ${lib.escapeShellArgs (lib.drop 2 argv)})";
    in
    [
      (expect "${name}: doctor wrapper installed" (
        wrapper != null
      ) "no every-channel-ipxe-qemu-doctor in environment.systemPackages")
      (expectEq "${name}: the unit runs `ec-ipxe-qemu run`" [
        "${ec}/bin/ec-ipxe-qemu"
        "run"
      ] (lib.take 2 argv))
      (expect "${name}: doctor runs the unit's argv with doctor for run" (lib.hasInfix doctorLine text)
        "\n  expected the line: ${doctorLine}\n  in: ${text}"
      )
      (expect "${name}: doctor drops to the unit's user and group"
        (lib.hasInfix "/bin/setpriv --reuid=every-channel-ipxe-qemu --regid=kvm" text)
        "no setpriv to every-channel-ipxe-qemu:kvm in: ${text}"
      )
    ];
  doctorChecks =
    doctorChecksFor "user-mode" (evalConfig [ enabled ])
    ++ doctorChecksFor "lan (derived MAC)" lanDerived
    ++ doctorChecksFor "lan (explicit, https URL with $ and %)" lanExplicit
    ++ doctorChecksFor "http + extra args" httpExtra
    ++ [
      (expectEq "disabled: no doctor wrapper" null (
        lib.findFirst (p: (p.name or "") == "every-channel-ipxe-qemu-doctor") null (
          lib.attrByPath [ "environment" "systemPackages" ] [ ] disabledConfig
        )
      ))
    ];

  # ---------------------------------------------------------------- for systemd-analyze
  # Unit files by configuration, as NixOS would install them; scripts by store path.
  hostUnits = config: {
    "every-channel-ipxe-qemu.service" = textOf config;
  };
  guestUnits =
    lib.mapAttrs (_: u: u.text) (
      lib.filterAttrs (n: _: lib.hasPrefix "every-channel-" n) guest.systemd.units
    )
    // lib.mapAttrs (_: u: u.text) guest.systemd.network.units;
  units = {
    user-mode = hostUnits (evalConfig [ enabled ]);
    lan = hostUnits lanDerived;
    lan-explicit = hostUnits lanExplicit;
    http-extra = hostUnits httpExtra;
    credentials = hostUnits credentialsConfig;
    example-forge-host = hostUnits forge;
    example-lan-host = hostUnits lanDerived;
    guest = guestUnits;
  };
  scripts =
    lib.listToAttrs (
      map (
        name:
        let
          exec = guest.systemd.services.${name}.serviceConfig.ExecStart;
        in
        lib.nameValuePair exec.outPath exec.text
      ) (lib.attrNames (lib.filterAttrs (n: _: lib.hasPrefix "every-channel-" n) guest.systemd.services))
    )
    # the host's doctor wrapper, for `bash -n`
    // lib.listToAttrs (
      map (w: lib.nameValuePair w.outPath w.text) [
        (doctorOf lanExplicit)
      ]
    );

  all =
    defaultChecks
    ++ disabledChecks
    ++ unitChecks
    ++ assertionChecks
    ++ typeChecks
    ++ execChecks
    ++ warningChecks
    ++ renderedChecks
    ++ refusalChecks
    ++ validatorChecks
    ++ credentialChecks
    ++ doctorChecks
    ++ guestChecks;
in
builtins.deepSeq all {
  result = "module-eval: all ${toString (builtins.length all)} checks passed";
  nixos = "real NixOS systemd modules and utils from ${toString nixpkgs}";
  defaults = builtins.length defaultChecks;
  unit = builtins.length (disabledChecks ++ unitChecks);
  assertions = builtins.length assertionChecks;
  types = builtins.length typeChecks;
  commandLines = builtins.length execChecks;
  warnings = builtins.length warningChecks;
  renderedUnits = builtins.length renderedChecks;
  credentials = builtins.length credentialChecks;
  guest = builtins.length guestChecks;
  doctorWrapper = builtins.length doctorChecks;
  refusalTable = "${toString (builtins.length refusalTable.cases)} values: ${toString (builtins.length refusedBadValues)} bad ones refused at evaluation, ${
    toString (builtins.length refusalTable.cases - builtins.length refusedBadValues)
  } good ones accepted";
  validateNix = "${toString (builtins.length coveredCases)} values of the table checked against nix/lib/validate.nix directly";
  checks = all;
  inherit units scripts;
}
