# The conservative deployment: a forge host with no tuner LAN.
#
# The guest gets only the user-mode (slirp) boot NIC: iPXE does DHCP on it and chains to
# the boot source, nothing is attached to a host interface, and the host's networking is
# left alone. Guest SSH is reachable from the host's loopback only.
#
# Pick the boot source in your own configuration, for example this flake's netboot package:
#
#   services.every-channel.ipxe-qemu.boot.http = {
#     enable = true;
#     directory = inputs.ec-ipxe-qemu.packages.x86_64-linux.ec-publisher-netboot;
#   };
#
# or an HTTPS URL with `services.every-channel.ipxe-qemu.boot.url`. With neither, the
# launcher's built-in diagnostics script runs and reports the boot path on the serial log.
{
  services.every-channel.ipxe-qemu = {
    enable = true;
    memory = 2048;
    cpus = 2;
    disk.size = "16G";
    boot.userNet = {
      hostname = "ec-publisher";
      hostForwards = [ "tcp:127.0.0.1:2222-:22" ];
    };
  };
}
