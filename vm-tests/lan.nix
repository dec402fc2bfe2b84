# Two nodes on one VLAN. `lan` runs dnsmasq and the HDHomeRun emulator; `host` runs the
# module with lan.enable on its VLAN NIC (eth1). The guest's iPXE (served script) does DHCP
# on its LAN NIC (net1, the macvtap) and prints the lease on the serial console.
{ self }:

let
  stateDir = "/var/lib/every-channel/ipxe-qemu";
in
{
  name = "ec-ipxe-qemu-lan";

  nodes = {
    lan = ./lan-segment.nix;

    host =
      { lib, pkgs, ... }:
      {
        imports = [
          self.nixosModules.ec-ipxe-qemu
          ../nix/examples/lan-host.nix
        ];

        virtualisation.memorySize = 1536;
        virtualisation.cores = 2;
        networking.useDHCP = false;
        environment.systemPackages = [ pkgs.libhdhomerun ];

        services.every-channel.ipxe-qemu = {
          accel = "tcg";
          memory = 256;
          cpus = 1;
          disk.size = "1G";
          lan.macvtap.interface = lib.mkForce "eth1";
          boot.http = {
            enable = true;
            directory = pkgs.writeTextDir "netboot.ipxe" ''
              #!ipxe
              dhcp net1 || dhcp net1 || dhcp net1 || goto failed
              set part LAN-DHCP-OK
              echo EC-VMTEST-''${part} ''${net1/ip} ''${net1/mac}
              # What the publisher guest says once it is up: its LAN address, then ready.
              echo ec-publisher: lan ''${net1/ip}
              echo ec-publisher: ready
              goto idle
              :failed
              echo EC-VMTEST-LAN-DHCP-FAILED
              :idle
              sleep 3600 || shell
              goto idle
            '';
          };
        };
      };
  };

  testScript =
    { nodes, ... }:
    let
      ecMacvtap = "${nodes.host.services.every-channel.ipxe-qemu.package}/bin/ec-macvtap";
      ecIpxeQemu = "${nodes.host.services.every-channel.ipxe-qemu.package}/bin/ec-ipxe-qemu";
    in
    ''
      import json

      unit = "every-channel-ipxe-qemu.service"
      serial = "${stateDir}/serial.log"


      def cap_mask(pid: str, field: str) -> int:
          line = host.succeed(f"grep '^{field}:' /proc/{pid}/status").split()
          return int(line[1], 16)


      start_all()
      lan.wait_for_unit("lan-dnsmasq.service")
      lan.wait_for_unit("hdhomerun-emulator.service")

      with subtest("the tuner emulator answers libhdhomerun"):
          host.wait_for_unit("network.target")
          # Replies to a broadcast are not conntrack-related; let them in for this check.
          host.succeed("iptables -w -I nixos-fw -p udp --sport 65001 -j nixos-fw-accept")
          host.wait_until_succeeds(
              "hdhomerun_config discover | grep -q 'hdhomerun device 1040CAFC found at 192.168.1.'",
              timeout=60,
          )

      with subtest("the macvtap exists while the unit runs"):
          host.wait_for_unit(unit)
          host.succeed("ip -d link show ec-lan0 | grep -q macvtap")
          shown = json.loads(host.succeed("${ecMacvtap} --json show ec-lan0"))
          link = shown[0] if isinstance(shown, list) else shown
          assert link["owned"] is True, link
          assert link["parent"] == "eth1", link
          # The host keeps its own address on the parent.
          host.succeed("ip -4 addr show dev eth1 | grep -q 'inet 192.168.1.'")

      with subtest("dnsmasq leased an address to exactly the macvtap's MAC"):
          host.wait_until_succeeds(f"grep -q EC-VMTEST-LAN-DHCP-OK {serial}", timeout=900)
          words = host.succeed(f"grep -a -o 'EC-VMTEST-LAN-DHCP-OK.*' {serial} | head -n1").split()
          guest_ip, guest_mac = words[1], words[2].lower()
          macvtap_mac = json.loads(host.succeed("ip -j link show ec-lan0"))[0]["address"].lower()
          leases = [
              line.split()
              for line in lan.succeed("cat /var/lib/lan-dnsmasq/leases").splitlines()
              if line.strip()
          ]
          assert len(leases) == 1, f"expected exactly one lease, got {leases}"
          assert leases[0][1].lower() == macvtap_mac, f"lease {leases[0]} vs macvtap {macvtap_mac}"
          assert leases[0][2] == guest_ip, f"lease {leases[0]} vs guest {guest_ip}"
          assert guest_mac == macvtap_mac, f"guest NIC {guest_mac} vs macvtap {macvtap_mac}"

      with subtest("the unit became active on the guest's ready line; status shows its LAN address"):
          host.wait_for_unit(unit)
          status = json.loads(host.succeed(f"${ecIpxeQemu} status --json --state-dir ${stateDir}"))
          assert status["ready"] is True and status["stage"] == "ready", status
          assert status["lan_address"] == guest_ip, f"status {status} vs lease {guest_ip}"
          text = host.succeed(f"systemctl show -P StatusText {unit}").strip()
          assert text.startswith("ready:"), text

      with subtest("the LAN NIC's packets go through vhost-net (lan.vhost = auto, the device exists)"):
          # The module loads vhost_net and allows /dev/vhost-net; the launcher opened it and QEMU holds it.
          host.succeed("test -c /dev/vhost-net")
          qemu_pid = host.succeed("pgrep -u every-channel-ipxe-qemu -f qemu-system-x86_64").split()[0]
          fds = host.succeed(f"ls -l /proc/{qemu_pid}/fd")
          assert "/dev/vhost-net" in fds, f"QEMU holds no vhost-net fd:\n{fds}"
          argv = host.succeed(f"tr '\\0' ' ' < /proc/{qemu_pid}/cmdline")
          assert "vhost=on,vhostfd=" in argv, argv
          host.succeed(f"journalctl -u {unit} -o cat | grep -q 'vhost-net: on'")

      with subtest("the host configured nothing on the macvtap"):
          # dhcpcd, networkd and NetworkManager are told to leave it alone; ec-macvtap turned
          # off IPv6 address generation, so not even a link-local address may appear.
          addrs = json.loads(host.succeed("ip -j addr show dev ec-lan0"))[0].get("addr_info", [])
          assert addrs == [], f"the host put addresses on the macvtap: {addrs}"

      with subtest("QEMU and the launcher run without capabilities"):
          qemu_pid = host.succeed("pgrep -u every-channel-ipxe-qemu -f qemu-system-x86_64").split()[0]
          main_pid = host.succeed(f"systemctl show -P MainPID {unit}").strip()
          for pid in (qemu_pid, main_pid):
              assert cap_mask(pid, "CapEff") == 0, f"pid {pid} has effective capabilities"
              assert cap_mask(pid, "CapPrm") == 0, f"pid {pid} has permitted capabilities"
              assert cap_mask(pid, "CapBnd") == 0, f"pid {pid} has a non-empty bounding set"
          # CAP_NET_ADMIN is bit 12.
          assert not (cap_mask(qemu_pid, "CapEff") >> 12) & 1

      with subtest("the macvtap is gone after stop"):
          host.succeed(f"systemctl stop {unit}")
          host.fail("ip link show ec-lan0")
          host.succeed("ip link show eth1")
    '';
}
