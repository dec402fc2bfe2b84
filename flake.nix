{
  description = "ec-ipxe-qemu: an always-running, iPXE-booted QEMU guest (the every-channel publisher) with an optional macvtap LAN NIC";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      inherit (nixpkgs) lib;
      pkgs = nixpkgs.legacyPackages.${system};

      publisherSystem =
        extraModules:
        lib.nixosSystem {
          modules = [
            self.nixosModules.ec-publisher-guest
            ./nix/configurations/publisher-common.nix
          ]
          ++ extraModules;
        };
    in
    {
      packages.${system} = {
        ec-ipxe-qemu = pkgs.callPackage ./nix/package.nix { };
        default = self.packages.${system}.ec-ipxe-qemu;
        ec-publisher-netboot = pkgs.callPackage ./nix/netboot-dir.nix {
          nixos = self.nixosConfigurations.ec-publisher-x86_64-netboot;
        };
      };

      # Modules are imported (functions), not bare paths: Nix 2.8's flake check rejects paths.
      nixosModules = {
        ec-ipxe-qemu = import ./nix/modules/ec-ipxe-qemu.nix;
        ec-publisher-guest = import ./nix/modules/ec-publisher-guest.nix;
      };

      nixosConfigurations = {
        ec-publisher-x86_64 = publisherSystem [ ./nix/configurations/ec-publisher-x86_64.nix ];
        ec-publisher-x86_64-netboot = publisherSystem [
          ./nix/configurations/ec-publisher-x86_64-netboot.nix
        ];
      };

      checks.${system} = import ./vm-tests { inherit pkgs self; } // {
        # Both modules evaluated against the real NixOS systemd code of the pinned nixpkgs
        # (the same test `make test` runs against ../shared/nixos-eval); a mismatch fails
        # the evaluation of this check.
        module-eval =
          let
            result = import ./nix/tests/module-eval { nixpkgs = nixpkgs.outPath; };
          in
          pkgs.runCommand "ec-module-eval"
            {
              passAsFile = [ "summary" ];
              summary = builtins.toJSON (
                removeAttrs result [
                  "checks"
                  "units"
                  "scripts"
                ]
              );
            }
            ''
              cp "$summaryPath" $out
            '';

        # The publisher configurations must at least evaluate and build their top level.
        ec-publisher-x86_64 = self.nixosConfigurations.ec-publisher-x86_64.config.system.build.toplevel;
        inherit (self.packages.${system}) ec-ipxe-qemu ec-publisher-netboot;
      };

      devShells.${system}.default = pkgs.mkShell {
        inputsFrom = [ self.packages.${system}.ec-ipxe-qemu ];
        packages = [
          pkgs.cargo
          pkgs.rustc
          pkgs.clippy
          pkgs.rustfmt
          pkgs.rust-analyzer
          pkgs.nixfmt
          pkgs.deadnix
          pkgs.qemu_kvm
          pkgs.ipxe
          pkgs.dnsmasq
          pkgs.iproute2
          pkgs.libhdhomerun
        ];
      };

      formatter.${system} = pkgs.nixfmt;
    };
}
