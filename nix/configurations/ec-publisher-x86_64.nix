# The publisher installed on the guest's disk: root is the ext4 filesystem labelled
# "nixos" on the launcher's qcow2 (/dev/vda), GRUB on the same disk. Build it with
# `nixos-rebuild --flake .#ec-publisher-x86_64` inside the guest or `nixos-install`.
{
  boot.loader.grub.device = "/dev/vda";
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };
  # The disk holds the root filesystem, so it is not a separate data disk here.
  every-channel.publisherGuest.dataDisk.enable = false;
}
