# ec-ipxe-qemu: both binaries (`ec-ipxe-qemu`, `ec-macvtap`), their man pages and
# bash/zsh/fish completions, generated at build time from the clap definitions by the
# crate's `ec-gen-assets` helper (cargo feature `gen-assets`), which is not installed.
{
  lib,
  stdenv,
  rustPlatform,
  installShellFiles,
}:

let
  root = ../.;
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "ec-ipxe-qemu";
  inherit (cargoToml.package) version;

  # Only what cargo needs: editing the Nix files, README or CI config does not rebuild.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions (
      [
        ../Cargo.toml
        ../Cargo.lock
        ../src
      ]
      ++ map lib.fileset.maybeMissing [
        ../build.rs
        ../benches
        ../tests
        ../examples
      ]
    );
  };

  cargoLock.lockFile = ../Cargo.lock;

  buildFeatures = [ "gen-assets" ];

  nativeBuildInputs = [ installShellFiles ];

  # The crate's tests need root, network namespaces and QEMU; they run in the project's
  # own test command and in the NixOS VM tests (flake checks), not in the sandbox.
  doCheck = false;

  postInstall =
    lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
      $out/bin/ec-gen-assets assets
      installManPage assets/man/*.1
      for cmd in ec-macvtap ec-ipxe-qemu; do
        installShellCompletion --cmd "$cmd" \
          --bash "assets/completions/$cmd.bash" \
          --zsh "assets/completions/_$cmd" \
          --fish "assets/completions/$cmd.fish"
      done
    ''
    + ''
      rm -f $out/bin/ec-gen-assets
    '';

  meta = {
    description = "Run an iPXE-booted QEMU guest as a systemd service, with an optional macvtap LAN NIC";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "ec-ipxe-qemu";
  };
}
