# The unit the NixOS module renders for the systemd lab (tests/systemd_module_unit.rs): LAN on the
# lab's uplink, TCG (KVM does not work under the test machines' nested virtualisation), a
# small guest. Rendered by the real NixOS code (./nixos.nix); the test then substitutes only
# the binaries, QEMU, iPXE and the lab's network namespace.
{
  nixpkgs,
  interface,
  # the lab's systemd (tests/systemd_module_unit.rs passes it), so the unit carries only the keys
  # that systemd knows
  systemdVersion ? "258",
  # A directory for `boot.http` (`--boot-dir`), e.g. the real test guest's; null: the diagnostics boot.
  bootDir ? null,
  # more settings of services.every-channel.ipxe-qemu, as JSON (e.g. credentials and a boot
  # directory for tests/systemd_credentials.rs), merged over the lab's
  extra ? "{}",
}:

let
  nixos = import ./nixos.nix { inherit nixpkgs systemdVersion; };
  bootModules =
    if bootDir == null then
      [ ]
    else
      [
        {
          services.every-channel.ipxe-qemu.boot.http = {
            enable = true;
            directory = bootDir;
          };
        }
      ];
  config =
    (nixos.eval (
      [
        ../modules/ec-ipxe-qemu.nix
        {
          services.every-channel.ipxe-qemu = nixos.lib.recursiveUpdate {
            enable = true;
            accel = "tcg";
            memory = 256;
            cpus = 1;
            disk.size = "64M";
            lan.enable = true;
            lan.macvtap.interface = interface;
          } (builtins.fromJSON extra);
        }
      ]
      ++ bootModules
    )).config;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
in
if failed != [ ] then
  throw "lab-unit: failed assertions: ${builtins.toJSON failed}"
else
  {
    text = config.systemd.units."every-channel-ipxe-qemu.service".text;
    store = {
      ec-ipxe-qemu = nixos.pkgs.ec-ipxe-qemu.outPath;
      qemu = nixos.pkgs.qemu_kvm.outPath;
      ipxe = nixos.pkgs.ipxe.outPath;
    };
  }
