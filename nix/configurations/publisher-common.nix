# Shared by both publisher configurations. Downstream configurations add tuner and
# broadcast choices, SSH keys (every-channel.publisherGuest.sshAuthorizedKeys), etc.
{ lib, ... }:
{
  nixpkgs.hostPlatform = lib.mkDefault "x86_64-linux";
  every-channel.publisherGuest.enable = true;
  networking.hostName = lib.mkDefault "ec-publisher";
  time.timeZone = lib.mkDefault "UTC";
  system.stateVersion = "25.11";
}
