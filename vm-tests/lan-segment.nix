# The `lan` node of the LAN tests: the tuner LAN a host's macvtap is attached to.
# It runs a DHCP server (dnsmasq, leases in /var/lib/lan-dnsmasq/leases) and a small
# HDHomeRun discovery emulator answering for device 1040CAFC on UDP 65001.
{ pkgs, utils, ... }:

{
  networking.useDHCP = false;
  networking.firewall.enable = false;

  systemd.services.lan-dnsmasq = {
    description = "DHCP server of the test LAN";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    serviceConfig = {
      ExecStart = utils.escapeSystemdExecArgs [
        "${pkgs.dnsmasq}/bin/dnsmasq"
        "--keep-in-foreground"
        "--conf-file=/dev/null"
        "--port=0"
        "--interface=eth1"
        "--bind-dynamic"
        "--dhcp-range=192.168.1.100,192.168.1.150,1h"
        "--dhcp-authoritative"
        "--dhcp-leasefile=/var/lib/lan-dnsmasq/leases"
        "--log-dhcp"
        "--log-facility=-"
        "--user=root"
      ];
      StateDirectory = "lan-dnsmasq";
      Restart = "always";
    };
  };

  systemd.services.hdhomerun-emulator = {
    description = "HDHomeRun discovery emulator (device 1040CAFC)";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    serviceConfig = {
      ExecStart = utils.escapeSystemdExecArgs [
        "${pkgs.python3}/bin/python3"
        "${./hdhomerun-emulator.py}"
        "--device-id"
        "1040CAFC"
      ];
      DynamicUser = true;
      Restart = "always";
    };
  };
}
