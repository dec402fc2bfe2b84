# NixOS module: run the every-channel publisher guest in QEMU, booted by iPXE,
# as the always-running unit `every-channel-ipxe-qemu`.
#
# Interface contract: DESIGN.md (section "Nix"). The unit runs
#   ExecStartPre=+ec-macvtap create ...   (root, only with lan.enable)
#   ExecStart=ec-ipxe-qemu run ...        (static user in group kvm, no capabilities)
#   ExecStopPost=+ec-macvtap delete ...   (root, only with lan.enable)
# Every command line is built as a Nix list and escaped once with
# utils.escapeSystemdExecArgs; user strings are never spliced into shell text.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib) mkOption types literalExpression;

  cfg = config.services.every-channel.ipxe-qemu;

  serviceName = "every-channel-ipxe-qemu";
  serviceUser = serviceName;
  serviceGroup = "kvm";

  defaultDiskPath = "${cfg.stateDir}/disk.qcow2";

  # `pkgs.ec-ipxe-qemu` when an overlay provides it, else the package built from this
  # repository (the flake's nixosModules export this file unchanged).
  ecPkgs = {
    ec-ipxe-qemu = pkgs.ec-ipxe-qemu or (pkgs.callPackage ../package.nix { });
  };

  # An absolute path without whitespace or '%' (both would need quoting in
  # tmpfiles.d lines; '%' is a systemd specifier).
  absolutePath = types.strMatching "/[^[:space:]%]*";

  macAddressType = types.strMatching "[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}";

  # The launcher's disk-size rule (`ByteSize` in src/launcher/config.rs): digits with an
  # optional unit K, M, G or T (powers of 1024, optionally followed by "iB") or B, in any
  # case; at least 1M and at most 64T. The number is clamped while it is read, so a long
  # one cannot overflow.
  diskSizeOk =
    size:
    let
      parts = builtins.match "([0-9]+)([kKmMgGtT]|[kKmMgGtT][iI][bB]|[bB])?" size;
      unit = lib.toLower (lib.substring 0 1 (toString (builtins.elemAt parts 1)));
      shift =
        {
          "" = 0;
          b = 0;
          k = 10;
          m = 20;
          g = 30;
          t = 40;
        }
        .${unit};
      cap = 140737488355328; # 2^47, above every limit below
      number = lib.foldl' (n: d: lib.min cap (n * 10 + lib.toInt d)) 0 (
        lib.stringToCharacters (builtins.elemAt parts 0)
      );
      # number * 2^shift within [2^20, 2^46], without multiplying
      pow2 = e: lib.foldl' (x: _: x * 2) 1 (lib.range 1 e);
      minimum = if shift >= 20 then 1 else pow2 (20 - shift);
      maximum = pow2 (46 - shift);
    in
    parts != null && number >= minimum && number <= maximum;

  diskSizeType = types.addCheck types.str diskSizeOk // {
    description = "disk size between 1M and 64T (digits with an optional unit K, M, G or T)";
  };

  # Characters the Rust `IfName` refuses besides '/' and ':': Unicode white space and
  # control characters (C0, DEL, C1). Nix has no "\v" or "\f" escape (they mean "v" and
  # "f"), so the characters are made from their code points.
  fromCodePoint = cp: builtins.fromJSON ''"\u${lib.fixedWidthString 4 "0" (lib.toHexString cp)}"'';
  whitespaceChars = map fromCodePoint (
    lib.range 9 13
    ++ [
      32
      133
      160
      5760
    ]
    ++ lib.range 8192 8202
    ++ [
      8232
      8233
      8239
      8287
      12288
    ]
  );
  controlChars = map fromCodePoint (lib.range 1 31 ++ lib.range 127 159);
  containsAny = chars: name: lib.any (c: lib.hasInfix c name) chars;

  # The interface-name rule of ec-macvtap (and of the kernel): 1-15 bytes, no '/', no
  # ':', no whitespace or control characters, not "." or "..". Returns null when the
  # name is fine.
  ifNameProblem =
    name:
    let
      len = builtins.stringLength name;
    in
    if len == 0 then
      "is empty"
    else if len > 15 then
      "is ${toString len} bytes long; Linux allows at most 15"
    else if lib.hasInfix "/" name then
      "contains '/'"
    else if lib.hasInfix ":" name then
      "contains ':'"
    else if containsAny whitespaceChars name then
      "contains whitespace"
    else if containsAny controlChars name then
      "contains a control character"
    else if name == "." || name == ".." then
      "is '.' or '..'"
    else
      null;

  # The launcher's value rules (src/launcher/config.rs, src/cli/launcher.rs), so that a
  # value it would refuse (exit 2, which the unit does not restart) fails evaluation
  # instead. tests/refusals.json feeds the same values to both sides.

  # Rust's Ipv4Addr: four decimal octets 0-255 without leading zeros.
  isIPv4 =
    s:
    let
      octets = builtins.match "(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})" s;
    in
    octets != null && lib.all (o: lib.toInt o <= 255) octets;

  # Rust's Ipv6Addr: up to eight groups of 1-4 hex digits, at most one "::", optionally
  # ending in an IPv4 address (which counts as two groups).
  isIPv6 =
    s:
    let
      halves = lib.splitString "::" s;
      groupsOf = h: if h == "" then [ ] else lib.splitString ":" h;
      groups = lib.concatMap groupsOf halves;
      lastIsV4 = groups != [ ] && isIPv4 (lib.last groups);
      hexGroups = if lastIsV4 then lib.init groups else groups;
      count = builtins.length hexGroups + (if lastIsV4 then 2 else 0);
      hexOk = lib.all (g: builtins.match "[0-9a-fA-F]{1,4}" g != null) hexGroups;
      # an IPv4 part only at the very end
      v4Last = lib.all (g: !(isIPv4 g)) (lib.take (builtins.length groups - 1) groups);
    in
    builtins.length halves <= 2
    && hexOk
    && v4Last
    && (if builtins.length halves == 2 then count <= 7 else count == 8);

  # Rust's u16 parse (leading zeros allowed), 1-65535.
  isPort =
    s:
    let
      m = builtins.match "0*([0-9]{1,5})" s;
    in
    m != null && lib.toInt (builtins.head m) >= 1 && lib.toInt (builtins.head m) <= 65535;

  # `--host-forward`: [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT (HostForward).
  hostForwardOk =
    rule:
    let
      m = builtins.match "(([^:-]*):)?([^:-]*):([^:-]*)-([^:]*):(.*)" rule;
      at = builtins.elemAt m;
      addrOk = a: a == "" || isIPv4 a;
    in
    m != null
    && lib.elem (if at 0 == null then "" else at 1) [
      ""
      "tcp"
      "udp"
    ]
    && addrOk (at 2)
    && isPort (at 3)
    && addrOk (at 4)
    && isPort (at 5);

  # `--hostname` (Hostname): dot-separated labels of letters, digits and '-', 1-63 bytes
  # each, not starting or ending with '-', 253 bytes in all.
  hostnameOk =
    name:
    builtins.stringLength name <= 253
    && lib.all (l: builtins.match "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?" l != null) (
      lib.splitString "." name
    );

  # `--boot-nic-model`, `--lan-nic-model` (NicModel).
  nicModelOk = m: builtins.match "[A-Za-z0-9._-]{1,64}" m != null;

  # `--boot-url` (BootUrl): http, https or tftp (any case), a host, an optional port
  # (1-65535 or an iPXE ${setting}), no whitespace, control characters, quotes,
  # backslashes or backquotes.
  bootUrlProblem =
    url:
    let
      m = builtins.match "([^:]*)://([^/?#]*)(.*)" url;
      scheme = lib.toLower (builtins.elemAt m 0);
      authority = builtins.elemAt m 1;
      hostport = lib.last (lib.splitString "@" authority);
      v6 = builtins.match "\\[([^]]*)](.*)" hostport;
      plain = builtins.match "([^:]*)(:(.*))?" hostport;
      # the launcher splits host and port at the last ':'
      lastColon = builtins.match "(.*):([^:]*)" hostport;
      host =
        if lib.hasPrefix "[" hostport then
          (if v6 == null then null else builtins.elemAt v6 0)
        else if lastColon != null then
          builtins.elemAt lastColon 0
        else
          builtins.elemAt plain 0;
      port =
        if lib.hasPrefix "[" hostport then
          (
            if v6 != null && lib.hasPrefix ":" (builtins.elemAt v6 1) then
              lib.removePrefix ":" (builtins.elemAt v6 1)
            else
              null
          )
        else if lastColon != null then
          builtins.elemAt lastColon 1
        else
          null;
    in
    if m == null then
      "is not a URL like http://HOST/PATH"
    else if
      !(lib.elem scheme [
        "http"
        "https"
        "tftp"
      ])
    then
      "has the scheme \"${builtins.elemAt m 0}\"; use http, https or tftp"
    else if
      containsAny (
        whitespaceChars
        ++ controlChars
        ++ [
          "\""
          "'"
          "\\"
          "`"
        ]
      ) url
    then
      "contains whitespace, a control character, a quote, a backslash or a backquote"
    else if lib.hasPrefix "[" hostport && v6 == null then
      "has an unterminated IPv6 address"
    else if host == "" || host == null then
      "has no host"
    else if port != null && !(lib.hasPrefix "\${" port || isPort port) then
      "has the port \"${port}\", not a number between 1 and 65535"
    else
      null;

  # stateDir and disk.path: never a system directory, and written the one way systemd,
  # tmpfiles and the launcher all read alike.
  systemDirs = [
    "/"
    "/var"
    "/var/lib"
    "/srv"
  ];
  pathProblem =
    path:
    let
      components = lib.tail (lib.splitString "/" path);
    in
    if lib.elem path systemDirs then
      "is a system directory"
    else if lib.hasSuffix "/" path then
      "ends with '/'"
    else if lib.any (c: c == "." || c == ".." || c == "") components then
      "has an empty, '.' or '..' component"
    else if containsAny [ "\"" "'" "\\" "`" ] path then
      "contains a quote, a backslash or a backquote"
    else
      null;

  # `--ready-pattern` is a Rust regex. Nix cannot compile one, so this checks what breaks
  # most patterns: it must not be empty (an empty pattern matches every line), and its
  # parentheses and brackets must balance (backslash escapes, and a `]` first in a class,
  # are literal). The launcher parses the full syntax at start and exits 2 (not restarted).
  readyPatternProblem =
    pattern:
    let
      chars = lib.stringToCharacters pattern;
      step =
        st: c:
        if st.bad != null then
          st
        else if st.escaped then
          st // { escaped = false; }
        else if c == "\\" then
          st // { escaped = true; }
        else if st.class then
          (if c == "]" && !st.classStart then st // { class = false; } else st // { classStart = false; })
        else if c == "[" then
          st
          // {
            class = true;
            classStart = true;
          }
        else if c == "(" then
          st // { depth = st.depth + 1; }
        else if c == ")" then
          (
            if st.depth == 0 then
              st // { bad = "has a ')' without its '('"; }
            else
              st // { depth = st.depth - 1; }
          )
        else
          st;
      end = lib.foldl' step {
        bad = null;
        escaped = false;
        class = false;
        classStart = false;
        depth = 0;
      } chars;
    in
    if pattern == "" then
      "is empty (it would match every console line)"
    else if end.bad != null then
      end.bad
    else if end.escaped then
      "ends with a lone backslash"
    else if end.class then
      "has a '[' without its ']'"
    else if end.depth > 0 then
      "has a '(' without its ')'"
    else
      null;

  # The low bit of the first octet marks a group (multicast/broadcast) address.
  isMulticastMac =
    mac:
    lib.elem (lib.toLower (builtins.substring 1 1 mac)) [
      "1"
      "3"
      "5"
      "7"
      "9"
      "b"
      "d"
      "f"
    ];

  lanName = cfg.lan.macvtap.name;
  lanParent = cfg.lan.macvtap.interface;
  lanNameProblem = ifNameProblem lanName;
  lanParentProblem = if lanParent == null then null else ifNameProblem lanParent;
  mac = cfg.lan.macvtap.macAddress;

  stateUnderVarLib = lib.hasPrefix "/var/lib/" cfg.stateDir;
  diskOutsideState = cfg.disk.enable && !(lib.hasPrefix "${cfg.stateDir}/" cfg.disk.path);

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

  # `every-channel-ipxe-qemu-doctor [--json]`: the unit's own command line (runArgs, with
  # `doctor` for `run`) run as the unit's user, so it predicts what the unit will meet
  # without starting it. Root drops to that user with setpriv; the user runs it directly.
  # The caller's arguments go before the unit's, which may end in `-- EXTRA_QEMU_ARGS`.
  doctorWrapper = pkgs.writeShellScriptBin "every-channel-ipxe-qemu-doctor" ''
    set -eu
    doctor=(${
      lib.escapeShellArgs [
        "${cfg.package}/bin/ec-ipxe-qemu"
        "doctor"
      ]
    } "$@" ${lib.escapeShellArgs (lib.drop 2 runArgs)})
    if [ "$(${pkgs.coreutils}/bin/id -u)" -eq 0 ]; then
      exec ${pkgs.util-linux}/bin/setpriv --reuid=${serviceUser} --regid=${serviceGroup} \
        --init-groups --reset-env -- "''${doctor[@]}"
    fi
    if [ "$(${pkgs.coreutils}/bin/id -un)" = ${serviceUser} ]; then
      exec "''${doctor[@]}"
    fi
    echo "every-channel-ipxe-qemu-doctor: run it as root (or as ${serviceUser}): it checks as the unit's user ${serviceUser}" >&2
    exit 5
  '';

  parentDevice = lib.optional (
    cfg.lan.enable && lanParent != null && lanParentProblem == null
  ) "sys-subsystem-net-devices-${utils.escapeSystemdPath lanParent}.device";
in
{
  options.services.every-channel.ipxe-qemu = {
    enable = lib.mkEnableOption "the every-channel publisher guest: QEMU booted by iPXE, supervised by ec-ipxe-qemu";

    package = lib.mkPackageOption ecPkgs "ec-ipxe-qemu" {
      extraDescription = ''
        It provides both `ec-ipxe-qemu` (the launcher) and `ec-macvtap` (the LAN plumbing).
        Without an overlay that defines `pkgs.ec-ipxe-qemu`, the package is built from this
        repository's `nix/package.nix`.
      '';
    };

    qemuPackage = lib.mkPackageOption pkgs "QEMU" {
      default = [ "qemu_kvm" ];
      extraDescription = ''
        It must provide `bin/qemu-system-x86_64` and `bin/qemu-img`.
      '';
    };

    stateDir = mkOption {
      type = absolutePath;
      default = "/var/lib/every-channel/ipxe-qemu";
      example = "/srv/every-channel/ipxe-qemu";
      description = ''
        Directory holding `disk.qcow2`, the generated `boot.ipxe`, the QMP and console sockets,
        the lock, `status.json` and the serial log (`serial.log`; the previous boot's is
        `serial.log.1`). Below `/var/lib` it is managed with `StateDirectory=`;
        elsewhere it is created by tmpfiles and made writable with `ReadWritePaths=`.
      '';
    };

    memory = mkOption {
      type = types.ints.between 64 1048576;
      default = 2048;
      example = 4096;
      description = "Guest memory in MiB (`--memory`), 64 to 1048576.";
    };

    cpus = mkOption {
      type = types.ints.between 1 255;
      default = 2;
      example = 4;
      description = "Number of guest vCPUs (`--cpus`), 1 to 255.";
    };

    accel = mkOption {
      type = types.enum [
        "auto"
        "kvm"
        "tcg"
      ];
      default = "auto";
      example = "tcg";
      description = ''
        QEMU accelerator (`--accel`): `auto` uses KVM when `/dev/kvm` is usable and falls back
        to TCG; `kvm` requires it; `tcg` never uses it (slow, but works under nested
        virtualisation that breaks KVM).
      '';
    };

    disk = {
      enable = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = ''
          Whether to attach a persistent qcow2 disk. It is created with `qemu-img` only when
          missing and never overwritten. When disabled the launcher gets `--no-disk`.
        '';
      };

      path = mkOption {
        type = absolutePath;
        default = "${cfg.stateDir}/disk.qcow2";
        defaultText = literalExpression ''"''${config.services.every-channel.ipxe-qemu.stateDir}/disk.qcow2"'';
        example = "/srv/every-channel/publisher.qcow2";
        description = ''
          Path of the qcow2 disk. Passed as `--disk` only when it differs from the launcher's
          default `<stateDir>/disk.qcow2`; a path outside the state directory is added to
          `ReadWritePaths=` (its directory must exist).
        '';
      };

      size = mkOption {
        type = diskSizeType;
        default = "32G";
        example = "100G";
        description = ''
          Size of the qcow2 disk when it is created (`--disk-size`): a number of bytes or a
          number with the unit K, M, G or T (powers of 1024; `GiB` etc. work too), between
          1M and 64T.
        '';
      };
    };

    boot = {
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://netboot.example.org/ec-publisher/netboot.ipxe";
        description = ''
          iPXE chain target (`--boot-url`). HTTPS works with the default iPXE image. When
          neither this nor {option}`services.every-channel.ipxe-qemu.boot.http.enable` is set,
          the launcher's built-in diagnostics script runs and prints
          `ec-ipxe-qemu: boot path OK` on the serial console.
        '';
      };

      readyPattern = mkOption {
        type = types.nullOr types.singleLineStr;
        default = null;
        example = "^login: ?$";
        description = ''
          Regular expression (Rust `regex` syntax) for the guest console line that means the
          guest is up (`--ready-pattern`): the unit is `Type=notify` and becomes active (and
          `systemctl start` returns) only then. `null` keeps the launcher's default, the
          diagnostics' `ec-ipxe-qemu: boot path OK` or the publisher guest's
          `ec-publisher: ready`.
        '';
      };

      readyTimeout = mkOption {
        type = types.ints.between 0 86400;
        default = 600;
        example = 180;
        description = ''
          Seconds the guest has, from QEMU's start, to print its ready line
          (`--ready-timeout`); then the launcher stops QEMU and fails with exit 1, naming the
          boot stage it hung in, and `Restart=` tries again. The unit's `TimeoutStartSec=` is
          this plus 60 s (for `ExecStartPre` and QEMU's own start), so the launcher's message
          comes first. 0: no limit (`TimeoutStartSec=infinity`).
        '';
      };

      ipxePackage = lib.mkPackageOption pkgs "iPXE" {
        nullable = true;
        default = [ "ipxe" ];
        extraDescription = ''
          Its HTTPS-capable `ipxe.lkrn` is booted with the generated script (`--ipxe`). Set to
          `null` to let the boot NIC's option ROM load the script over slirp TFTP instead.
        '';
      };

      userNet = {
        dnsServers = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "9.9.9.9" ];
          description = "DNS servers handed to the guest on the user-mode boot NIC (`--dns`, repeated).";
        };

        hostname = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "ec-publisher";
          description = "Host name handed out by the user-mode DHCP server (`--hostname`).";
        };

        model = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "e1000";
          description = "QEMU device model of the boot NIC (`--boot-nic-model`); `null` keeps the launcher's default.";
        };

        hostForwards = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "tcp:127.0.0.1:2222-:22" ];
          description = "Host-to-guest port forwards in QEMU `hostfwd` syntax (`--host-forward`, repeated).";
        };
      };

      http = {
        enable = mkOption {
          type = types.bool;
          default = false;
          example = true;
          description = ''
            Whether the launcher serves {option}`services.every-channel.ipxe-qemu.boot.http.directory`
            over HTTP and chains to `netboot.ipxe` in it (`--boot-dir`); the guest reaches it
            at 10.0.2.2.
          '';
        };

        directory = mkOption {
          type = types.nullOr types.path;
          default = null;
          example = literalExpression "inputs.ec-ipxe-qemu.packages.x86_64-linux.ec-publisher-netboot";
          description = ''
            Directory with `netboot.ipxe` (plus whatever it loads, e.g. `bzImage` and `initrd`).
            A store path (such as this flake's `ec-publisher-netboot` package) restarts the
            unit whenever it changes. Directories under `/home` are hidden by `ProtectHome=`.
          '';
        };

        bindAddress = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "127.0.0.1";
          description = "Address the boot HTTP server binds to (`--boot-http-bind`); `null` keeps the launcher's default (loopback).";
        };

        port = mkOption {
          type = types.nullOr types.port;
          default = null;
          example = 8080;
          description = "Port of the boot HTTP server (`--boot-http-port`); `null` lets the launcher pick a free one.";
        };
      };
    };

    lan = {
      enable = mkOption {
        type = types.bool;
        default = false;
        example = true;
        description = ''
          Whether to give the guest a second NIC on the host's LAN through a macvtap on
          {option}`services.every-channel.ipxe-qemu.lan.macvtap.interface`. No bridge is needed
          and the host's addresses stay untouched; in bridge mode the host itself cannot reach
          the guest through that interface, other LAN hosts can.
        '';
      };

      model = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "virtio-net-pci";
        description = "QEMU device model of the LAN NIC (`--lan-nic-model`); `null` keeps the launcher's default.";
      };

      vhost = mkOption {
        type = types.enum [
          "auto"
          "on"
          "off"
        ];
        default = "auto";
        example = "on";
        description = ''
          vhost-net for the LAN NIC (`--lan-vhost`): the kernel moves its packets instead of
          QEMU's userspace. `auto` uses it when /dev/vhost-net opens (the module loads
          `vhost_net` and allows the device) and logs one line when it does not; `on` makes the
          unit fail when it cannot (exit 3 missing, 5 refused); `off` never uses it.
        '';
      };

      macvtap = {
        interface = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "eno1";
          description = "Wired host interface the macvtap is created on (`ec-macvtap create --link`).";
        };

        name = mkOption {
          type = types.str;
          default = "ec-lan0";
          example = "ec-tuners";
          description = ''
            Name of the macvtap link: 1-15 bytes, no '/', ':', whitespace or control
            characters. The host's dhcpcd, systemd-networkd and NetworkManager are told to
            leave it alone.
          '';
        };

        mode = mkOption {
          type = types.enum [
            "bridge"
            "vepa"
            "private"
            "passthru"
          ];
          default = "bridge";
          example = "private";
          description = "macvtap mode (`ec-macvtap create --mode`).";
        };

        macAddress = mkOption {
          type = types.nullOr macAddressType;
          default = null;
          example = "52:54:00:ec:00:01";
          description = ''
            Unicast MAC address of the macvtap (and of the guest's LAN NIC). `null` derives a
            stable, locally administered address from `/etc/machine-id`, the link name and the
            parent name, so the guest keeps its DHCP lease across restarts.
          '';
        };

        queues = mkOption {
          type = types.ints.between 1 16;
          default = 1;
          example = 4;
          description = "Number of tap queues the launcher opens for the LAN NIC (`--lan-queues`), 1 to 16.";
        };
      };
    };

    watchdogSec = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 60;
      description = ''
        systemd watchdog (`WatchdogSec=`): the launcher sends `WATCHDOG=1` every half period
        while QEMU reports the guest running, so a hung launcher or a guest stuck outside the
        running state gets the unit restarted. `null`: no watchdog.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "-device"
        "virtio-rng-pci"
      ];
      description = "Extra QEMU arguments, passed after `--`; each element is one argument.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions =
      let
        opt = "services.every-channel.ipxe-qemu";
        # One assertion per refused value, naming the option and the value.
        each =
          name: values: ok: rule:
          map (v: {
            assertion = ok v;
            message = "${opt}.${name} = ${builtins.toJSON v}: ${rule}";
          }) values;
        stateProblem = pathProblem cfg.stateDir;
        diskProblem = pathProblem cfg.disk.path;
        diskDir = dirOf cfg.disk.path;
        # The longest socket path the launcher makes in the state directory.
        consoleSocket = "${cfg.stateDir}/console.sock";
        urlProblem = if cfg.boot.url == null then null else bootUrlProblem cfg.boot.url;
        lanModel = if cfg.lan.model == null then "virtio-net-pci" else cfg.lan.model;
      in
      [
        {
          assertion = stateProblem == null;
          message = ''
            ${opt}.stateDir = "${cfg.stateDir}" ${toString stateProblem}. Use a directory of
            its own written plainly, for example "/var/lib/every-channel/ipxe-qemu" (the unit
            owns it: tmpfiles gives it to the service user and ReadWritePaths= opens it).
          '';
        }
        {
          assertion = !cfg.disk.enable || diskProblem == null;
          message = ''
            ${opt}.disk.path = "${cfg.disk.path}" ${toString diskProblem}. Use a file path
            such as "/var/lib/every-channel/ipxe-qemu/disk.qcow2".
          '';
        }
        {
          assertion = !diskOutsideState || !(lib.elem diskDir systemDirs);
          message = ''
            ${opt}.disk.path = "${cfg.disk.path}" lies directly in the system directory
            ${diskDir}, which the unit would have to make writable (ReadWritePaths=${diskDir}).
            Put the disk in a directory of its own, or inside stateDir.
          '';
        }
        {
          assertion = builtins.stringLength consoleSocket <= 107;
          message = ''
            ${opt}.stateDir = "${cfg.stateDir}" is too long: the console socket ${consoleSocket}
            would exceed the 107 bytes of a Unix socket path. Use a shorter directory.
          '';
        }
        {
          assertion = cfg.boot.readyPattern == null || readyPatternProblem cfg.boot.readyPattern == null;
          message = ''
            ${opt}.boot.readyPattern = ${builtins.toJSON cfg.boot.readyPattern} ${toString (readyPatternProblem (toString cfg.boot.readyPattern))}. Give a regular expression for the console line that means the guest is up,
            e.g. "^login: ?$", or null for the launcher's default.
          '';
        }
        {
          assertion = urlProblem == null;
          message = ''
            ${opt}.boot.url = ${builtins.toJSON cfg.boot.url} ${toString urlProblem}
            (the launcher takes http://, https:// or tftp://HOST[:PORT]/PATH).
          '';
        }
        {
          assertion = cfg.boot.http.bindAddress == null || isIPv4 cfg.boot.http.bindAddress;
          message = ''
            ${opt}.boot.http.bindAddress = ${builtins.toJSON cfg.boot.http.bindAddress} is not an
            IPv4 address; iPXE reaches the host over the user-mode network's IPv4 only (10.0.2.2).
            Use "127.0.0.1" or "0.0.0.0".
          '';
        }
        {
          assertion = cfg.boot.userNet.hostname == null || hostnameOk cfg.boot.userNet.hostname;
          message = ''
            ${opt}.boot.userNet.hostname = ${builtins.toJSON cfg.boot.userNet.hostname} is not a host
            name: use labels of letters, digits and '-' separated by dots, e.g. "ec-publisher".
          '';
        }
        {
          assertion = cfg.boot.userNet.model == null || nicModelOk cfg.boot.userNet.model;
          message = ''
            ${opt}.boot.userNet.model = ${builtins.toJSON cfg.boot.userNet.model} is not a QEMU device
            name like "virtio-net-pci" or "e1000".
          '';
        }
        {
          assertion = cfg.lan.model == null || nicModelOk cfg.lan.model;
          message = ''
            ${opt}.lan.model = ${builtins.toJSON cfg.lan.model} is not a QEMU device name like
            "virtio-net-pci" or "e1000".
          '';
        }
        {
          assertion = !cfg.lan.enable || cfg.lan.macvtap.queues == 1 || lib.hasPrefix "virtio-net" lanModel;
          message = ''
            ${opt}.lan.macvtap.queues = ${toString cfg.lan.macvtap.queues} needs a virtio-net LAN NIC,
            not "${lanModel}". Set lan.macvtap.queues = 1 or lan.model = "virtio-net-pci".
          '';
        }
        {
          assertion = !cfg.lan.enable || cfg.lan.vhost != "on" || lib.hasPrefix "virtio-net" lanModel;
          message = ''
            ${opt}.lan.vhost = "on" needs a virtio-net LAN NIC (vhost-net serves virtio only), not
            "${lanModel}". Set lan.vhost = "auto" or lan.model = "virtio-net-pci".
          '';
        }
      ]
      ++ each "boot.userNet.dnsServers" cfg.boot.userNet.dnsServers (
        a: isIPv4 a || isIPv6 a
      ) "not an IPv4 or IPv6 address (e.g. \"9.9.9.9\")"
      ++
        each "boot.userNet.hostForwards" cfg.boot.userNet.hostForwards hostForwardOk
          "not a QEMU hostfwd rule [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT with IPv4 addresses and ports 1-65535 (e.g. \"tcp:127.0.0.1:2222-:22\")"
      ++ [
        {
          assertion = !cfg.lan.enable || lanParent != null;
          message = ''
            services.every-channel.ipxe-qemu.lan.enable is true but lan.macvtap.interface is not set.
            Set services.every-channel.ipxe-qemu.lan.macvtap.interface to the wired host interface
            the guest should share (for example "eno1"), or set lan.enable = false.
          '';
        }
        {
          assertion = lanNameProblem == null;
          message = ''
            services.every-channel.ipxe-qemu.lan.macvtap.name = "${lanName}" ${toString lanNameProblem}.
            Use an interface name of 1-15 bytes without '/', ':' or whitespace, for example "ec-lan0".
          '';
        }
        {
          assertion = lanParentProblem == null;
          message = ''
            services.every-channel.ipxe-qemu.lan.macvtap.interface = "${toString lanParent}" ${toString lanParentProblem}.
            Set it to the name of an existing wired interface (see `ip link`), for example "eno1".
          '';
        }
        {
          assertion = mac == null || !(isMulticastMac mac);
          message = ''
            services.every-channel.ipxe-qemu.lan.macvtap.macAddress = "${toString mac}" is a multicast
            address (the low bit of the first octet is set). Use a unicast address such as
            "52:54:00:ec:00:01", or null for a stable derived one.
          '';
        }
        {
          assertion = mac == null || lib.toLower mac != "00:00:00:00:00:00";
          message = ''
            services.every-channel.ipxe-qemu.lan.macvtap.macAddress must not be all zero. Use a
            unicast address such as "52:54:00:ec:00:01", or null for a stable derived one.
          '';
        }
        {
          assertion = !cfg.boot.http.enable || cfg.boot.http.directory != null;
          message = ''
            services.every-channel.ipxe-qemu.boot.http.enable is true but boot.http.directory is null.
            Set services.every-channel.ipxe-qemu.boot.http.directory to a directory containing
            netboot.ipxe (for example this flake's packages.x86_64-linux.ec-publisher-netboot).
          '';
        }
        {
          assertion = !(cfg.boot.http.enable && cfg.boot.url != null);
          message = ''
            services.every-channel.ipxe-qemu.boot.url and boot.http.enable are both set; the guest can
            chain to only one of them. Unset boot.url or set boot.http.enable = false.
          '';
        }
      ];

    warnings =
      lib.optional (!cfg.boot.http.enable && cfg.boot.http.directory != null) ''
        services.every-channel.ipxe-qemu.boot.http.directory is set but boot.http.enable is false,
        so the directory is not served. Set boot.http.enable = true to boot from it.
      ''
      ++ lib.optional (!cfg.lan.enable && lanParent != null) ''
        services.every-channel.ipxe-qemu.lan.macvtap.interface is set but lan.enable is false, so no
        LAN NIC is created. Set lan.enable = true to give the guest a LAN NIC.
      '';

    environment.systemPackages = [ doctorWrapper ];

    users.users.${serviceUser} = {
      isSystemUser = true;
      group = serviceGroup;
      description = "every-channel iPXE/QEMU launcher";
    };

    boot.kernelModules = [
      "tun"
      "vhost_net"
    ]
    ++ lib.optional cfg.lan.enable "macvtap";

    # The macvtap belongs to the guest: the host's network configuration must not run DHCP
    # or otherwise configure it. Each setting only matters when its daemon is enabled
    # (dhcpcd, systemd-networkd, NetworkManager); the networkd file's "05-" sorts before
    # other matches.
    networking.dhcpcd.denyInterfaces = lib.mkIf cfg.lan.enable [ lanName ];
    networking.networkmanager.unmanaged = lib.mkIf cfg.lan.enable [ "interface-name:${lanName}" ];
    systemd.network.networks = lib.mkIf cfg.lan.enable {
      "05-every-channel-macvtap" = {
        matchConfig.Name = lanName;
        linkConfig.Unmanaged = true;
      };
    };

    systemd.tmpfiles.rules = lib.optional (
      !stateUnderVarLib
    ) "d ${cfg.stateDir} 0750 ${serviceUser} ${serviceGroup} - -";

    systemd.services.${serviceName} = {
      description = "every-channel publisher guest (QEMU booted by iPXE)";
      documentation = [ "man:ec-ipxe-qemu(1)" ] ++ lib.optional cfg.lan.enable "man:ec-macvtap(1)";
      wantedBy = [ "multi-user.target" ];
      wants = parentDevice;
      after = [ "network.target" ] ++ parentDevice;

      # Any change of the generated unit (options, packages, boot directory) restarts the
      # guest on `nixos-rebuild switch`. Stop-then-start (the default) lets the old
      # ExecStopPost remove the old macvtap before a renamed one is created.
      restartIfChanged = true;
      stopIfChanged = true;
      # Restart=always must never be rate-limited.
      startLimitIntervalSec = 0;

      # When /dev/tapN is missing or belongs to another device, ec-macvtap (ExecStartPre)
      # makes a private tap node under /dev/ec-macvtap/ (its default: /run is nodev under
      # systemd, so a node there could never be opened); the launcher looks for it there and
      # ExecStopPost removes it. No EC_MACVTAP_RUNTIME_DIR is set on purpose.

      serviceConfig = {
        # The launcher says READY=1 when the guest console shows the ready line, and
        # STATUS= at every boot stage (`systemctl status` shows it).
        Type = "notify";
        NotifyAccess = "main";
        TimeoutStartSec = if cfg.boot.readyTimeout == 0 then "infinity" else cfg.boot.readyTimeout + 60;
        User = serviceUser;
        Group = serviceGroup;

        ExecStart = utils.escapeSystemdExecArgs runArgs;

        Restart = "always";
        RestartSec = "5s";
        # Exit 2 is a usage error: restarting cannot fix it (evaluation refuses every value
        # the launcher is known to refuse, so this is the last line).
        RestartPreventExitStatus = 2;
        # SIGTERM goes to the launcher only; it powers the guest off over QMP and quits QEMU
        # after its shutdown timeout. Whatever is left gets SIGKILL after TimeoutStopSec.
        KillMode = "mixed";
        TimeoutStopSec = "2min";

        UMask = "0077";

        # Devices: QEMU needs kvm, tun and vhost-net; the macvtap's /dev/tapN (or the
        # private node ec-macvtap creates under the runtime directory) is a char-macvtap
        # device, and `m` lets ExecStartPre mknod it. PrivateDevices= would hide /dev/tapN
        # and must not be used.
        DevicePolicy = "closed";
        DeviceAllow = [
          "/dev/kvm rw"
          "/dev/net/tun rw"
          "/dev/vhost-net rw"
          "char-macvtap rwm"
        ];

        # The main process (launcher and QEMU) runs without any capability.
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;

        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateMounts = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        LockPersonality = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RestrictNamespaces = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        # AF_NETLINK: the launcher reads the macvtap's MAC; ec-macvtap (ExecStartPre) needs it too.
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_NETLINK"
        ];
        # No MemoryDenyWriteExecute=: QEMU's TCG needs writable+executable memory.
      }
      // lib.optionalAttrs (cfg.watchdogSec != null) { WatchdogSec = cfg.watchdogSec; }
      // lib.optionalAttrs cfg.lan.enable {
        # `+`: runs as root with full privileges (CAP_NET_ADMIN for netlink, mknod of a
        # private tap node under /dev/ec-macvtap). DeviceAllow still applies to it
        # (systemd#26035), hence char-macvtap with `m` above.
        ExecStartPre = "+" + utils.escapeSystemdExecArgs createArgs;
        ExecStopPost = "+" + utils.escapeSystemdExecArgs deleteArgs;
      }
      // (
        if stateUnderVarLib then
          {
            StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
            StateDirectoryMode = "0750";
          }
        else
          { ReadWritePaths = [ cfg.stateDir ]; }
      )
      // lib.optionalAttrs diskOutsideState {
        ReadWritePaths = lib.optional (!stateUnderVarLib) cfg.stateDir ++ [ (dirOf cfg.disk.path) ];
      };
    };
  };
}
