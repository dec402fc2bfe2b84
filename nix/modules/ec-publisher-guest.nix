# NixOS module for the guest side: the every-channel publisher booted by ec-ipxe-qemu.
#
# - serial console on ttyS0 (the launcher's serial log), virtio drivers in the initrd;
# - two NICs with stable names, told apart by the PCI slot the launcher gives them:
#   boot0 = 0000:00:03.0 (user-mode boot NIC), lan0 = 0000:00:04.0 (macvtap LAN NIC);
#   DHCP on both, with systemd-networkd;
# - a boot-time HDHomeRun discovery check on lan0 whose result goes to the console;
# - once multi-user.target is reached, `ec-publisher: credentials NAME...` (the credentials the
#   publisher expects, a missing one marked; names only), `ec-publisher: lan ADDRESS` (lan0's
#   IPv4 address, when there is a LAN NIC) and then `ec-publisher: ready` on ttyS0: the host's
#   launcher reads them as the guest's LAN address and its readiness (`Type=notify` on the host);
# - system credentials from the host (QEMU fw_cfg, imported by systemd) reach the module's units
#   through ImportCredential=; `ec.tuners`, a static tuner list, is asked directly when the
#   discovery broadcast finds nothing;
# - an optional data disk on the launcher's qcow2, formatted on first boot only when it
#   is blank and never reformatted.
# Tuner and broadcast choices stay with downstream configurations.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib) mkOption types;

  cfg = config.every-channel.publisherGuest;

  # PCI addresses fixed by ec-ipxe-qemu's QEMU command line (bus pci.0).
  bootPciPath = "pci-0000:00:03.0";
  lanPciPath = "pci-0000:00:04.0";

  disk = cfg.dataDisk;
  diskDeviceUnit = "${utils.escapeSystemdPath disk.device}.device";
  formatService = "every-channel-data-disk-format";

  # systemd's credential name rule (printable ASCII, no '/' or ':', not "." or "..") and the
  # launcher's fw_cfg limit (28 bytes), without what a unit file's ImportCredential= would read as
  # a glob or a specifier ('*', '?', '[', ']', '%', a backslash) and without spaces (the console
  # line separates names by spaces).
  credentialName =
    types.addCheck (types.strMatching "[!-$&-)+-.0-9;->@-Z^-~]{1,28}") (n: n != "." && n != "..")
    // {
      description = "credential name (1-28 printable ASCII characters, no space or any of / : % \\ * ? [ ])";
    };

  # The discovery and ready scripts live in ../guest as plain shell, so the project's Debian test guest
  # (scripts/build-test-guest.sh) runs the very text NixOS runs; here they get their PATH (and settings) in
  # front.
  guestScript =
    name: file: packages: setting:
    pkgs.writeShellScript name (
      ''
        PATH=${
          lib.makeBinPath (
            [
              pkgs.coreutils
              pkgs.gnugrep
              pkgs.iproute2
            ]
            ++ packages
          )
        }
        ${setting}
      ''
      + builtins.readFile file
    );
  discoveryScript = guestScript "every-channel-tuner-discovery" ../guest/ec-publisher-discover.sh [
    pkgs.libhdhomerun
  ] "EC_TUNER_ATTEMPTS=${toString cfg.tunerDiscovery.attempts}";

  # What the launcher on the host waits for (its default --ready-pattern), on ttyS0.
  readyScript =
    guestScript "every-channel-publisher-ready" ../guest/ec-publisher-ready.sh [ ]
      "EC_CREDENTIALS=${lib.escapeShellArg (lib.concatStringsSep "\n" cfg.credentials)}";

  formatScript = pkgs.writeShellScript formatService ''
    set -eu
    PATH=${
      lib.makeBinPath [
        pkgs.coreutils
        pkgs.diffutils
        pkgs.util-linux
        pkgs.e2fsprogs
      ]
    }
    dev=${lib.escapeShellArg disk.device}

    rc=0
    blkid -p "$dev" >/dev/null 2>&1 || rc=$?
    case "$rc" in
      0)
        echo "$dev already carries a filesystem or partition table; not formatting"
        exit 0
        ;;
      2) ;; # nothing identified: maybe blank
      *)
        echo "blkid -p $dev failed with status $rc; refusing to format" >&2
        exit 1
        ;;
    esac

    # "Blank" means no signature and only zeros in the first MiB (a fresh qcow2).
    if ! cmp -s -n 1048576 "$dev" /dev/zero; then
      echo "$dev has no known signature but is not blank; refusing to format" >&2
      exit 1
    fi

    echo "$dev is blank: creating ext4 labelled ${disk.label}"
    mkfs.ext4 -q -L ${lib.escapeShellArg disk.label} "$dev"
  '';
in
{
  options.every-channel.publisherGuest = {
    enable = lib.mkEnableOption "the every-channel publisher guest profile (serial console, virtio, boot0/lan0 DHCP, tuner discovery check)";

    sshAuthorizedKeys = mkOption {
      type = types.listOf types.singleLineStr;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly admin@forge" ];
      description = ''
        SSH public keys allowed to log in as root. When non-empty, OpenSSH is enabled
        (key-only). Reach it from the host through a
        {option}`services.every-channel.ipxe-qemu.boot.userNet.hostForwards` rule such as
        `tcp:127.0.0.1:2222-:22`.
      '';
    };

    credentials = mkOption {
      type = types.listOf credentialName;
      default = [ ];
      example = [
        "mesh-key"
        "ec.tuners"
      ];
      description = ''
        The systemd credentials the publisher expects from the host
        ({option}`services.every-channel.ipxe-qemu.credentials` there, passed by the launcher
        through QEMU's fw_cfg and imported by the guest's systemd as system credentials). The
        console gets `ec-publisher: credentials NAME...` before the ready line, a missing one
        marked `NAME(missing)`, so the host sees what did not arrive; names only, never a value.
        The module's ready unit imports them (`ImportCredential=`); a publisher service imports
        what it uses the same way, e.g.
        `systemd.services.my-publisher.serviceConfig.ImportCredential = [ "mesh-key" ];`,
        and reads `$CREDENTIALS_DIRECTORY/mesh-key`.
      '';
    };

    tunerDiscovery = {
      enable = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = ''
          Whether to run `hdhomerun_config discover` on lan0 at boot and print the result on
          the console (unit `every-channel-tuner-discovery`), and to let HDHomeRun replies
          (UDP from source port 65001) in through the firewall on lan0. When the broadcast
          finds nothing and the host passed the credential `ec.tuners` (IPv4 addresses, one
          per line, `#` comments), each of those tuners is asked directly (a discovery request
          sent to its address, as tvheadend's `hdhomerun_ip` does), for LANs where broadcast
          does not reach the tuners. The addresses must be reachable through lan0 (its subnet).
        '';
      };

      attempts = mkOption {
        type = types.ints.positive;
        default = 12;
        example = 3;
        description = "Discovery attempts (5 s apart) before the check reports that no tuner answered.";
      };
    };

    dataDisk = {
      enable = mkOption {
        type = types.bool;
        default = false;
        example = true;
        description = ''
          Whether to use the launcher's qcow2 as a persistent data disk. On first boot the
          device is formatted as ext4 only if it is blank (no signature, first MiB all
          zeros); a disk that already carries data is never reformatted.
        '';
      };

      device = mkOption {
        type = types.strMatching "/dev/[^[:space:]]+";
        default = "/dev/vda";
        example = "/dev/disk/by-id/virtio-ec-data";
        description = "Block device of the data disk (the launcher attaches the qcow2 as virtio-blk).";
      };

      mountPoint = mkOption {
        type = types.strMatching "/[^[:space:]]*";
        default = "/var/lib/every-channel";
        example = "/srv/recordings";
        description = "Where the data disk is mounted.";
      };

      label = mkOption {
        type = types.strMatching "[A-Za-z0-9_-]{1,16}";
        default = "ec-data";
        example = "recordings";
        description = "ext4 label given to the data disk when it is formatted.";
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        # Console: kernel, systemd status and the discovery result all land on ttyS0.
        boot.kernelParams = [
          "console=tty0"
          "console=ttyS0,115200n8"
        ];
        boot.initrd.availableKernelModules = [
          "virtio_pci"
          "virtio_blk"
          "virtio_scsi"
          "virtio_net"
          "virtio_rng"
          "ata_piix"
          "e1000"
        ];
        boot.initrd.kernelModules = [ "virtio_rng" ];

        networking.useNetworkd = true;
        networking.useDHCP = false;
        systemd.network = {
          enable = true;
          links = {
            "10-ec-boot0" = {
              matchConfig.Path = bootPciPath;
              linkConfig.Name = "boot0";
            };
            "10-ec-lan0" = {
              matchConfig.Path = lanPciPath;
              linkConfig.Name = "lan0";
            };
          };
          networks = {
            "10-ec-boot0" = {
              matchConfig.Name = "boot0";
              networkConfig.DHCP = "yes";
              dhcpV4Config.RouteMetric = 100;
              linkConfig.RequiredForOnline = "routable";
            };
            "10-ec-lan0" = {
              matchConfig.Name = "lan0";
              networkConfig.DHCP = "ipv4";
              networkConfig.LinkLocalAddressing = "no";
              # The LAN is for tuners; default traffic prefers the boot NIC.
              dhcpV4Config.RouteMetric = 1024;
              # The LAN NIC is optional (forge hosts run without it).
              linkConfig.RequiredForOnline = "no";
            };
          };
        };
      }

      {
        # After multi-user.target (and wanted by it): runs once the guest is up.
        systemd.services.every-channel-publisher-ready = {
          description = "every-channel: tell the host launcher on ttyS0 that the guest is up";
          wantedBy = [ "multi-user.target" ];
          after = [ "multi-user.target" ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = readyScript;
            # The expected credentials, for the credentials line (names only are printed).
            ImportCredential = cfg.credentials;
            StandardOutput = "tty";
            TTYPath = "/dev/ttyS0";
            TTYReset = false;
            TTYVHangup = false;
            # systemd opens TTYPath before dropping to the dynamic user.
            DynamicUser = true;
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            NoNewPrivileges = true;
            CapabilityBoundingSet = "";
            RestrictAddressFamilies = [
              "AF_UNIX"
              "AF_NETLINK"
            ];
          };
        };
      }

      (lib.mkIf (cfg.sshAuthorizedKeys != [ ]) {
        services.openssh = {
          enable = true;
          settings = {
            PasswordAuthentication = false;
            KbdInteractiveAuthentication = false;
            PermitRootLogin = "prohibit-password";
          };
        };
        users.users.root.openssh.authorizedKeys.keys = cfg.sshAuthorizedKeys;
      })

      (lib.mkIf cfg.tunerDiscovery.enable {
        environment.systemPackages = [ pkgs.libhdhomerun ];

        # Discovery replies come from UDP port 65001 to an ephemeral port, in answer to
        # a broadcast, so connection tracking does not see them as related.
        networking.firewall =
          if config.networking.nftables.enable then
            { extraInputRules = ''iifname "lan0" udp sport 65001 accept''; }
          else
            {
              extraCommands = "iptables -w -I nixos-fw -i lan0 -p udp --sport 65001 -j nixos-fw-accept";
            };

        systemd.services.every-channel-tuner-discovery = {
          description = "every-channel: HDHomeRun tuner discovery check on lan0";
          wantedBy = [ "multi-user.target" ];
          wants = [ "network-online.target" ];
          after = [
            "network-online.target"
            "firewall.service"
          ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = discoveryScript;
            # The optional static tuner list (missing: broadcast only).
            ImportCredential = "ec.tuners";
            StandardOutput = "journal+console";
            StandardError = "journal+console";
            DynamicUser = true;
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            PrivateDevices = true;
            NoNewPrivileges = true;
            CapabilityBoundingSet = "";
            RestrictAddressFamilies = [
              "AF_UNIX"
              "AF_INET"
              "AF_INET6"
              "AF_NETLINK"
            ];
          };
        };
      })

      (lib.mkIf disk.enable {
        systemd.services.${formatService} = {
          description = "every-channel: format the data disk ${disk.device} if it is blank";
          unitConfig.DefaultDependencies = false;
          requires = [ diskDeviceUnit ];
          after = [ diskDeviceUnit ];
          # The mount below pulls this unit in and waits for it (x-systemd.requires).
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = formatScript;
            StandardOutput = "journal+console";
          };
        };

        fileSystems.${disk.mountPoint} = {
          device = disk.device;
          fsType = "ext4";
          options = [
            "nofail"
            "x-systemd.requires=${formatService}.service"
            "x-systemd.device-timeout=60s"
          ];
        };
      })
    ]
  );
}
