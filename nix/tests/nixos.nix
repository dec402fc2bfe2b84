# Evaluate NixOS modules against the REAL NixOS systemd code, without full nixpkgs.
#
# `nixpkgs` is a directory laid out like nixpkgs: either the offline kit
# (../shared/nixos-eval, see its README: nixpkgs `lib`, nixos/lib/{utils,systemd-*}.nix,
# nixos/modules/system/boot/systemd.nix, nixos/modules/misc/assertions.nix and an excerpt
# of networkd.nix) or a nixpkgs checkout (the flake check passes its pinned input).
# Real: `lib.evalModules`, every `systemd.*` option type, `utils`, the unit text
# generation (`config.systemd.units.<name>.text`, `config.systemd.network.units.<name>.text`).
# Stubbed, as the kit's README lists: `pkgs` (fake derivations; builders build nothing),
# and NixOS options outside the kit accepted untyped, except the list options the modules
# append to, which get their real list types.
#
# `systemdVersion`: the version of the fake `pkgs.systemd` (the default of
# `systemd.package`), which decides the keys a module renders for it (e.g. RestartSteps=
# from 254 on). The default is NixOS 25.11's; tests that hand units to a real systemd pass
# that systemd's version.
{
  nixpkgs,
  systemdVersion ? "258",
}:

let
  lib = import (nixpkgs + "/lib");
  inherit (lib) mkOption types;

  # A fake derivation: what `types.package` accepts and what string interpolation needs.
  fakePkg = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
    meta.mainProgram = name;
  };
  # Builders keep their input so tests can check what would be built (e.g. `bash -n` a script).
  fakeBuilder =
    name: text:
    fakePkg name
    // {
      inherit text;
      ecFake = "script";
    };

  fakeSystemd =
    version:
    fakePkg "systemd-${version}"
    // {
      withCryptsetup = false;
    };

  pkgs =
    lib.genAttrs [
      "coreutils"
      "findutils"
      "gnugrep"
      "gnused"
      "iproute2"
      "libhdhomerun"
      "diffutils"
      "util-linux"
      "e2fsprogs"
      "bash"
    ] fakePkg
    // {
      ec-ipxe-qemu = fakePkg "ec-ipxe-qemu-0.1.0";
      qemu_kvm = fakePkg "qemu-host-cpu-only-10.1.2";
      ipxe = fakePkg "ipxe-1.21.1-unstable";
      systemd = fakeSystemd systemdVersion;
      writeShellScript = fakeBuilder;
      writeShellScriptBin = fakeBuilder;
      writeText = fakeBuilder;
      writeScript = fakeBuilder;
      runCommand =
        name: _env: script:
        fakeBuilder name script;
      linkFarm = name: _entries: fakePkg name;
      stdenv.hostPlatform.is64bit = true;
    };

  untyped = mkOption {
    type = types.submodule { freeformType = types.attrsOf types.anything; };
    default = { };
  };
  listOfStr = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  networkdModule =
    let
      excerpt = nixpkgs + "/nixos/modules/system/boot/networkd-excerpt.nix";
    in
    if builtins.pathExists excerpt then
      excerpt
    else
      nixpkgs + "/nixos/modules/system/boot/networkd.nix";

  stubs = {
    options = {
      users = untyped;
      # The guest module reads networking.nftables.enable while defining
      # networking.firewall: both need declarations of their own.
      networking = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf types.anything;
          options.nftables.enable = mkOption {
            type = types.bool;
            default = false;
          };
          options.firewall = untyped;
          # read by the full networkd.nix (wait-online.anyInterface's default)
          options.useDHCP = mkOption {
            type = types.bool;
            default = true;
          };
        };
        default = { };
      };
      # environment.systemPackages: the real list type (systemd.nix and the modules append to it)
      environment = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf types.anything;
          options.systemPackages = mkOption {
            type = types.listOf types.package;
            default = [ ];
          };
        };
        default = { };
      };
      # One untyped option per service the modules and systemd.nix set, not one `services`
      # option: as in NixOS, `options.services.every-channel.ipxe-qemu` must be the module's
      # own option set (its assertions name options through it).
      services = lib.genAttrs [
        "dbus"
        "logrotate"
        "openssh"
      ] (_: untyped);
      system = untyped;
      ids = untyped;
      security = untyped;
      fileSystems = untyped;
      lib = untyped;
      boot = {
        kernelModules = listOfStr;
        kernelParams = listOfStr;
        extraSystemdUnitPaths = listOfStr;
        isContainer = mkOption {
          type = types.bool;
          default = false;
        };
        # An option set, not a freeform submodule: nixpkgs' full networkd.nix (the flake check
        # uses it) declares boot.initrd.systemd.network.* and reads boot.initrd.systemd.enable.
        initrd = {
          availableKernelModules = listOfStr;
          kernelModules = listOfStr;
          systemd.enable = mkOption {
            type = types.bool;
            default = false;
          };
          network = untyped;
        };
        kernel = untyped;
      };
      systemd.tmpfiles.rules = listOfStr;
    };
  };

  # evalModules with the real systemd modules; `utils` is the real nixos/lib/utils.nix,
  # built from this very evaluation's config (passed as specialArgs, as NixOS does).
  eval =
    modules:
    let
      result = lib.evalModules {
        specialArgs.utils = import (nixpkgs + "/nixos/lib/utils.nix") {
          inherit lib pkgs;
          inherit (result) config;
        };
        modules = [
          { _module.args.pkgs = pkgs; }
          (nixpkgs + "/nixos/modules/system/boot/systemd.nix")
          (nixpkgs + "/nixos/modules/misc/assertions.nix")
          networkdModule
          stubs
        ]
        ++ modules;
      };
    in
    result;
in
{
  inherit
    lib
    pkgs
    fakePkg
    fakeSystemd
    eval
    ;
}
