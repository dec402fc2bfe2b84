# NixOS module: run the every-channel publisher guest in QEMU, booted by iPXE,
# as the always-running unit `every-channel-ipxe-qemu`.
#
# The unit runs
#   ExecStartPre=+ec-macvtap create ...   (root, only with lan.enable)
#   ExecStart=ec-ipxe-qemu run ...        (static user in group kvm, no capabilities)
#   ExecStopPost=+ec-macvtap delete ...   (root, only with lan.enable)
# Every command line is built as a Nix list and escaped once with
# utils.escapeSystemdExecArgs; user strings are never spliced into shell text.
#
# Layout: the interface (options) and the implementation (the unit and what it needs)
# here; the command lines in ./ec-ipxe-qemu/command-line.nix, the evaluation-time checks in
# ./ec-ipxe-qemu/asserts.nix, the doctor wrapper in
# ./ec-ipxe-qemu/doctor.nix; the launcher's value rules, mirrored in Nix, in
# ../lib/validate.nix.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib) mkOption types literalExpression;

  validate = import ../lib/validate.nix { inherit lib; };

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
  absolutePath = types.strMatching validate.absolutePathRegex;

  macAddressType = types.strMatching validate.macAddressRegex;

  diskSizeType = types.addCheck types.str validate.isDiskSize // {
    description = "disk size between 1M and 64T (digits with an optional unit K, M, G or T)";
  };

  lanName = cfg.lan.macvtap.name;
  lanParent = cfg.lan.macvtap.interface;
  lanParentOk = lanParent != null && validate.ifNameProblem lanParent == null;
  mac = cfg.lan.macvtap.macAddress;

  # RestartSteps= and RestartMaxDelaySec= (systemd 254): older versions would warn about
  # unknown keys at every daemon-reload.
  restartBackoff = lib.versionAtLeast (lib.getVersion config.systemd.package) "254";

  stateUnderVarLib = lib.hasPrefix "/var/lib/" cfg.stateDir;
  diskOutsideState = cfg.disk.enable && !(lib.hasPrefix "${cfg.stateDir}/" cfg.disk.path);

  # The command lines of the unit (ExecStartPre, ExecStart, ExecStopPost), as lists.
  inherit
    (import ./ec-ipxe-qemu/command-line.nix {
      inherit
        lib
        cfg
        serviceUser
        defaultDiskPath
        lanName
        lanParent
        mac
        ;
    })
    createArgs
    deleteArgs
    runArgs
    ;

  # `every-channel-ipxe-qemu-doctor`: the unit's command line with `doctor` for `run`.
  doctorWrapper = import ./ec-ipxe-qemu/doctor.nix {
    inherit lib pkgs runArgs;
    inherit (cfg) package;
    user = serviceUser;
    group = serviceGroup;
  };

  parentDevice = lib.optional (
    cfg.lan.enable && lanParentOk
  ) "sys-subsystem-net-devices-${utils.escapeSystemdPath lanParent}.device";
in
{
  imports = [ ./ec-ipxe-qemu/asserts.nix ];

  ###### interface

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
        default = 900;
        example = 180;
        description = ''
          Seconds the guest has, from QEMU's start, to print its ready line
          (`--ready-timeout`); then the launcher stops QEMU and fails with exit 1, naming the
          boot stage it hung in, and `Restart=` tries again. The unit's `TimeoutStartSec=` is
          this plus 60 s (for `ExecStartPre` and QEMU's own start), so the launcher's message
          comes first. 0: no limit (`TimeoutStartSec=infinity`).

          The default, 15 minutes, covers a NixOS netboot image on a slow link: an ~800 MB
          initrd at 10 Mbit/s takes 800 MB × 8 / 10 Mbit/s ≈ 640 s (11 min) to download, which
          leaves 4 minutes for the firmware, iPXE, the kernel and the guest's services. Lower
          it for a small image or a fast link, so a hung boot is retried sooner.
        '';
      };

      cache = {
        enable = mkOption {
          type = types.bool;
          default = cfg.boot.url != null;
          defaultText = lib.literalExpression "config.services.every-channel.ipxe-qemu.boot.url != null";
          example = false;
          description = ''
            The verified boot cache (`--boot-cache`): iPXE chains to the launcher's loopback
            server, which fetches every file under {option}`services.every-channel.ipxe-qemu.boot.url`'s
            directory with the host's TLS (system roots plus
            {option}`services.every-channel.ipxe-qemu.boot.cache.caFiles`), keeps it in
            `stateDir/boot-cache`, revalidates it on every boot and, when the origin fails, boots
            the guest from the last set that reached ready. A restart then costs no download,
            and the guest comes back during an internet outage. The launcher leaves it off by
            itself for a tftp URL, one with iPXE settings (`''${...}`) or one on 10.0.2.2. `false`
            passes `--boot-cache off`: iPXE fetches the URL itself
            ({option}`services.every-channel.ipxe-qemu.boot.ipxePackage` then decides whether
            HTTPS works).
          '';
        };

        caFiles = mkOption {
          type = types.listOf types.path;
          default = [ ];
          example = [ "/etc/ssl/private-netboot-ca.pem" ];
          description = ''
            PEM files of CA certificates the boot cache trusts for the origin, besides the host's
            system roots (`--boot-ca`, repeated). Needs the cache on.
          '';
        };
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

    credentials = mkOption {
      type = types.attrsOf (
        types.submodule {
          options.file = mkOption {
            type = absolutePath;
            example = "/run/keys/ec-mesh-key";
            description = ''
              Absolute path of the file, as a string (a Nix path such as `./key` would be copied
              into the world-readable store). systemd reads it as root, so it may be root-only.
            '';
          };
          options.secret = mkOption {
            type = types.bool;
            default = true;
            description = "Whether the value is secret: only a non-secret file (e.g. a `pkgs.writeText` tuner list) may be in the Nix store.";
          };
        }
      );
      default = { };
      example = literalExpression ''{ mesh-key.file = "/run/keys/ec-mesh-key"; }'';
      description = ''
        systemd credentials for the guest. Each becomes `LoadCredential=NAME:FILE` on the unit;
        the launcher passes every file of `$CREDENTIALS_DIRECTORY` to the guest as the fw_cfg
        file `opt/io.systemd.credentials/NAME`, which a systemd guest imports as a system
        credential, never through a command line, a log or `status.json`. NAME: printable
        ASCII without `/`, `:`, `%` or a backslash, not `.` or `..`, at most
        ${toString validate.credentialNameMax} bytes (QEMU's fw_cfg names have at most 55).
      '';
    };
  };

  ###### implementation

  config = lib.mkIf cfg.enable {
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

        # A crash restarts within 5 s; repeated failures back off (restartBackoff).
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
      // lib.optionalAttrs restartBackoff {
        # Delays of 5, 11, 26, 58, 132 s, then 5 min; the count is reset by a manual start,
        # `systemctl reset-failed` or (systemd >= 258) RESTART_RESET=1 from the launcher.
        RestartSteps = 5;
        RestartMaxDelaySec = "5min";
      }
      // lib.optionalAttrs (cfg.watchdogSec != null) { WatchdogSec = cfg.watchdogSec; }
      // lib.optionalAttrs (cfg.credentials != { }) {
        # systemd copies each file, as root, into the unit's private $CREDENTIALS_DIRECTORY,
        # where the launcher (an unprivileged user) finds it.
        LoadCredential = lib.mapAttrsToList (name: c: "${name}:${c.file}") cfg.credentials;
      }
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
