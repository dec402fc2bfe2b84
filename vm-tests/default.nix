# NixOS VM tests, wired into the flake's `checks`. Each file is a runNixOSTest module.
#   user-mode          forge example, user-mode boot of a tiny script via boot.http (TCG)
#   lan                two nodes: DHCP + tuner emulator on the LAN, macvtap on the host (TCG)
#   publisher-netboot  the real publisher netboot package through the module (nested KVM, slow)
{ pkgs, self }:

let
  runTest = file: pkgs.testers.runNixOSTest (import file { inherit self; });
in
{
  user-mode = runTest ./user-mode.nix;
  lan = runTest ./lan.nix;
  publisher-netboot = runTest ./publisher-netboot.nix;
}
