# The publisher as a netboot image: everything lives in RAM (the Nix store is a squashfs
# inside the initrd) and the launcher's qcow2 is the persistent data disk. Built into
# packages.x86_64-linux.ec-publisher-netboot. Uses nixpkgs' netboot module with the
# minimal profile, not the installer profile.
{ modulesPath, ... }:
{
  imports = [
    (modulesPath + "/installer/netboot/netboot.nix")
    (modulesPath + "/profiles/minimal.nix")
  ];
  every-channel.publisherGuest.dataDisk.enable = true;
}
