# A host that also gives the guest a NIC on its tuner LAN.
#
# `ec-macvtap` creates the macvtap `ec-lan0` on the wired interface before the launcher
# starts and deletes it after the unit stops; the guest's LAN NIC gets the macvtap's MAC
# (stable, derived from /etc/machine-id) and takes its address from the LAN's DHCP server.
# The host's own addresses on that interface are untouched. In macvtap bridge mode the host
# itself cannot reach the guest through that interface; tuners and other LAN hosts can.
{
  services.every-channel.ipxe-qemu = {
    enable = true;
    lan.enable = true;
    lan.macvtap.interface = "eno1";
  };
}
