# The conservative forge setup: user-mode boot only, no LAN. The guest's iPXE chains to a
# tiny script served by the launcher from boot.http.directory; it prints a marker on the
# serial console and idles.
{ self }:

let
  stateDir = "/var/lib/every-channel/ipxe-qemu";
in
{
  name = "ec-ipxe-qemu-user-mode";

  nodes.machine =
    { lib, pkgs, ... }:
    {
      imports = [
        self.nixosModules.ec-ipxe-qemu
        ../nix/examples/forge-host.nix
      ];

      virtualisation.memorySize = 1536;
      virtualisation.cores = 2;

      services.every-channel.ipxe-qemu = {
        # Nested KVM is not available everywhere; iPXE is quick enough under TCG.
        accel = "tcg";
        memory = lib.mkForce 256;
        cpus = lib.mkForce 1;
        disk.size = lib.mkForce "1G";
        # The served script is the "guest": its marker line is what ready means (Type=notify).
        boot.readyPattern = "^EC-VMTEST-USER-MODE-OK$";
        boot.http = {
          enable = true;
          directory = pkgs.writeTextDir "netboot.ipxe" ''
            #!ipxe
            set part USER-MODE-OK
            echo EC-VMTEST-''${part}
            :idle
            sleep 3600 || shell
            goto idle
          '';
        };
      };
    };

  testScript =
    { nodes, ... }:
    let
      qemuImg = "${nodes.machine.services.every-channel.ipxe-qemu.qemuPackage}/bin/qemu-img";
      ecIpxeQemu = "${nodes.machine.services.every-channel.ipxe-qemu.package}/bin/ec-ipxe-qemu";
    in
    ''
      unit = "every-channel-ipxe-qemu.service"
      state = "${stateDir}"
      serial = f"{state}/serial.log"
      disk = f"{state}/disk.qcow2"
      marker = "EC-VMTEST-USER-MODE-OK"


      def wait_for_marker() -> None:
          machine.wait_until_succeeds(f"grep -q {marker} {serial}", timeout=600)


      def restarts() -> int:
          return int(machine.succeed(f"systemctl show -P NRestarts {unit}").strip())


      start_all()

      with subtest("the unit is active and the guest booted the served script"):
          machine.wait_for_unit(unit)
          # Type=notify: active means the ready line was on the console.
          machine.succeed(f"grep -q {marker} {serial}")
          machine.succeed(f"systemctl is-active {unit}")
          machine.succeed("pgrep -u every-channel-ipxe-qemu -f qemu-system-x86_64")
          status_text = machine.succeed(f"systemctl show -P StatusText {unit}").strip()
          assert status_text.startswith("ready:"), status_text
          machine.succeed(f"${ecIpxeQemu} status --state-dir {state} --json | grep -q '\"ready\": true'")

      with subtest("disk.qcow2 exists and survives a restart"):
          machine.succeed(f"test -s {disk}")
          machine.succeed(f"systemctl stop {unit}")
          # Tag the image while QEMU is stopped; a recreated image would lose the tag.
          machine.succeed("${qemuImg} snapshot -c ec-vmtest-keep " + disk)
          machine.succeed(f"mv {serial} {serial}.before-restart")
          machine.succeed(f"systemctl start {unit}")
          machine.wait_for_unit(unit)
          wait_for_marker()
          machine.succeed("${qemuImg} snapshot -U -l " + disk + " | grep -q ec-vmtest-keep")

      with subtest("after SIGKILL the unit restarts and the guest comes back"):
          before = restarts()
          machine.succeed(f"mv {serial} {serial}.before-kill")
          machine.succeed(f"systemctl kill -s KILL {unit}")
          machine.wait_until_succeeds(
              f"test $(systemctl show -P NRestarts {unit}) -gt {before}", timeout=120
          )
          machine.wait_for_unit(unit)
          wait_for_marker()
          assert restarts() > before
          machine.succeed("${qemuImg} snapshot -U -l " + disk + " | grep -q ec-vmtest-keep")
    '';
}
