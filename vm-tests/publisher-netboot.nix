# The real thing, slowly: the host boots the publisher netboot package
# (packages.x86_64-linux.ec-publisher-netboot) through the module's boot.http, with the
# LAN NIC on the test VLAN, and the publisher's boot-time discovery check must find the
# emulated tuner. Needs nested KVM on the machine running the test.
{ self }:

let
  stateDir = "/var/lib/every-channel/ipxe-qemu";
in
{
  name = "ec-ipxe-qemu-publisher-netboot";

  nodes = {
    lan = ./lan-segment.nix;

    host =
      { lib, ... }:
      {
        imports = [
          self.nixosModules.ec-ipxe-qemu
          ../nix/examples/lan-host.nix
        ];

        virtualisation.memorySize = 4096;
        virtualisation.cores = 2;
        networking.useDHCP = false;

        services.every-channel.ipxe-qemu = {
          accel = "kvm";
          memory = 2048;
          cpus = 2;
          disk.size = "2G";
          lan.macvtap.interface = lib.mkForce "eth1";
          boot.http = {
            enable = true;
            directory = self.packages.x86_64-linux.ec-publisher-netboot;
          };
        };
      };
  };

  testScript = ''
    unit = "every-channel-ipxe-qemu.service"
    serial = "${stateDir}/serial.log"

    start_all()
    lan.wait_for_unit("lan-dnsmasq.service")
    lan.wait_for_unit("hdhomerun-emulator.service")

    with subtest("nested KVM is available"):
        host.succeed("test -c /dev/kvm")

    with subtest("the publisher boots and its discovery check finds the tuner"):
        # Type=notify: active once the guest printed `ec-publisher: ready` on ttyS0.
        host.wait_for_unit(unit)
        host.succeed(f"grep -a -q 'ec-publisher: ready' {serial}")
        text = host.succeed(f"systemctl show -P StatusText {unit}").strip()
        assert text.startswith("ready:"), text
        host.wait_until_succeeds(
            f"grep -a -q 'ec-publisher: tuner discovery: FOUND hdhomerun device 1040CAFC' {serial}",
            timeout=1800,
        )

    with subtest("the blank data disk was formatted on first boot"):
        host.succeed(f"grep -a -q 'is blank: creating ext4' {serial}")
        lan.succeed("test $(grep -c . /var/lib/lan-dnsmasq/leases) -eq 1")
  '';
}
