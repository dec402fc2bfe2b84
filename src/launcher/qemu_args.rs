//! The QEMU argv, built purely from a validated [`LaunchConfig`] and what was resolved at run time (the
//! accelerator, the LAN MAC and fd numbers). `print-args` prints exactly this; `run` executes it.
//!
//! Fixed PCI slots let the guest tell its NICs apart: the boot NIC is 00:03.0, the LAN NIC 00:04.0, the disk
//! 00:05.0.

use std::path::Path;

use crate::launcher::accel::Accel;
use crate::launcher::config::LaunchConfig;
use crate::launcher::layout::{BOOT_SCRIPT, usernet};
use crate::names::MacAddr;

pub(super) const BOOT_NIC_ADDR: &str = "0x3";
pub(super) const LAN_NIC_ADDR: &str = "0x4";
pub(super) const DISK_ADDR: &str = "0x5";

/// The first fd number QEMU inherits.
pub(crate) const FIRST_FD: i32 = 3;

/// Every fd QEMU inherits, by its number in QEMU, in this order from [`FIRST_FD`] on: the LAN tap queues,
/// their vhost-net fds, the launcher's QMP end, the serial port's end. `run` passes the fds in this order
/// and `print-args` prints the same numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FdPlan {
    pub(crate) lan: Option<LanNicFds>,
    /// The launcher's own QMP connection (one end of a socket pair; operators get `qmp.sock`).
    pub(crate) qmp: i32,
    /// The serial port (one end of a socket pair; the console broker reads the other).
    pub(crate) serial: i32,
}

/// The LAN NIC as QEMU sees it: the macvtap's MAC, the fd numbers of its tap queues and, with vhost-net,
/// those of the `/dev/vhost-net` fds (one per queue; empty without vhost).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LanNicFds {
    pub(crate) mac: MacAddr,
    pub(crate) taps: Vec<i32>,
    pub(crate) vhost: Vec<i32>,
}

impl FdPlan {
    /// `lan`: the LAN NIC's MAC, its tap queues and its vhost-net fds.
    pub(crate) fn new(lan: Option<(MacAddr, u32, u32)>) -> FdPlan {
        let fd = |i: u32| FIRST_FD + i as i32;
        let lan = lan.map(|(mac, queues, vhost)| LanNicFds {
            mac,
            taps: (0..queues).map(fd).collect(),
            vhost: (queues..queues + vhost).map(fd).collect(),
        });
        let qmp = FIRST_FD + lan.as_ref().map_or(0, |l| (l.taps.len() + l.vhost.len()) as i32);
        FdPlan { lan, qmp, serial: qmp + 1 }
    }
}

/// QEMU option values are comma-separated: a literal comma is written twice.
pub(super) fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// QEMU's seccomp sandbox: no obsolete syscalls, no privilege changes, no fork/exec, no scheduler or
/// resource changes. The guest reaches slirp, so QEMU's own attack surface is kept small.
pub(super) const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The argv (program first), with the fd numbers of `fds`.
pub(crate) fn build(cfg: &LaunchConfig, accel: Accel, fds: &FdPlan) -> Vec<String> {
    let qmp_fd = fds.qmp;
    let mut a: Vec<String> = Vec::with_capacity(48);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[&cfg.qemu.to_string_lossy()]);
    push(&["-name", "ec-ipxe-qemu", "-nodefaults", "-no-user-config", "-display", "none"]);
    // graphics=off: SeaBIOS and the option ROM print to the serial port (there is no VGA).
    push(&["-machine", "pc,graphics=off", "-accel", accel.as_str(), "-cpu", accel.cpu_model()]);
    push(&["-m", &cfg.memory_mib.to_string(), "-smp", &cfg.cpus.to_string()]);
    push(&["-sandbox", SANDBOX]);
    // A guest panic (reported through pvpanic) makes QEMU exit with a failure instead of powering off quietly.
    push(&["-action", "panic=exit-failure", "-device", "pvpanic"]);
    push(&[
        "-chardev",
        &format!("socket,id=ec-launcher-qmp,fd={qmp_fd}"),
        "-mon",
        "chardev=ec-launcher-qmp,mode=control",
    ]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", path(&cfg.qmp_socket()))]);
    // The serial port is a socket pair whose other end the launcher reads (the console broker).
    push(&["-chardev", &format!("socket,id=serial0,fd={}", fds.serial), "-serial", "chardev:serial0"]);

    // Boot NIC: user-mode networking. Without --ipxe its option ROM fetches boot.ipxe over slirp TFTP.
    let mut user = format!(
        "user,id=boot,net={},host={},dns={},dhcpstart={}",
        usernet::NET,
        usernet::HOST,
        usernet::DNS,
        usernet::GUEST
    );
    if cfg.ipxe.is_none() {
        user.push_str(&format!(",tftp={},bootfile={BOOT_SCRIPT}", path(&cfg.tftp_dir())));
    }
    if let Some(h) = &cfg.hostname {
        user.push_str(&format!(",hostname={}", h.as_str()));
    }
    for f in &cfg.host_forwards {
        user.push_str(&format!(",hostfwd={f}"));
    }
    let mut boot_dev = format!("{},netdev=boot,addr={BOOT_NIC_ADDR}", cfg.boot_nic_model.as_str());
    match &cfg.ipxe {
        None => boot_dev.push_str(",bootindex=1"),
        Some(_) => boot_dev.push_str(",romfile="),
    }
    push(&["-netdev", &user, "-device", &boot_dev]);
    if let Some(ipxe) = &cfg.ipxe {
        push(&["-kernel", &path(ipxe), "-initrd", &path(&cfg.boot_script())]);
    }

    // LAN NIC: the macvtap's queues, its MAC, no option ROM (iPXE never boots from the LAN).
    if let (Some(spec), Some(nic)) = (&cfg.lan, &fds.lan) {
        let fds: Vec<String> = nic.taps.iter().map(|f| f.to_string()).collect();
        let vhost: Vec<String> = nic.vhost.iter().map(|f| f.to_string()).collect();
        let mut netdev = if fds.len() == 1 {
            format!("tap,id=lan,fd={}", fds[0])
        } else {
            format!("tap,id=lan,fds={}", fds.join(":"))
        };
        // QEMU pairs fd= with vhostfd= and fds= with vhostfds=.
        match vhost.len() {
            0 => {}
            1 if fds.len() == 1 => netdev.push_str(&format!(",vhost=on,vhostfd={}", vhost[0])),
            _ => netdev.push_str(&format!(",vhost=on,vhostfds={}", vhost.join(":"))),
        }
        let mut dev = format!("{},netdev=lan,mac={},romfile=,addr={LAN_NIC_ADDR}", spec.model.as_str(), nic.mac);
        if fds.len() > 1 {
            dev.push_str(&format!(",mq=on,vectors={}", 2 * fds.len() + 2));
        }
        push(&["-netdev", &netdev, "-device", &dev]);
    }

    if let Some(d) = &cfg.disk {
        push(&[
            "-drive",
            &format!("if=none,id=disk0,file={},format=qcow2,discard=unmap", path(&d.path)),
            "-device",
            &format!("virtio-blk-pci,drive=disk0,addr={DISK_ADDR}"),
        ]);
    }
    // Credentials: QEMU reads each file itself; only names and paths are on the command line.
    for c in &cfg.credentials {
        push(&["-fw_cfg", &format!("name={},file={}", escape(&c.name.fw_cfg_name()), path(&c.path))]);
    }
    a.extend(cfg.extra.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use crate::launcher::options::LaunchOptions;

    /// A config from options (state dir `@T/s`, QEMU `@T/qemu-system-x86_64`, no disk unless `edit` says
    /// otherwise), with the file-system checks of `from_options` satisfied by a temp dir `@T`.
    fn cfg(edit: impl FnOnce(&Path, &mut LaunchOptions)) -> (LaunchConfig, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let qemu = tmp.path().join("qemu-system-x86_64");
        std::fs::write(&qemu, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(tmp.path().join("ipxe.lkrn"), b"x").unwrap();
        let mut o = LaunchOptions { qemu: qemu.clone(), no_disk: true, ..LaunchOptions::new(tmp.path().join("s")) };
        edit(tmp.path(), &mut o);
        (LaunchConfig::from_options(&o).unwrap(), tmp)
    }

    fn golden(args: Vec<String>, tmp: &tempfile::TempDir) -> String {
        args.join(" ").replace(tmp.path().to_str().unwrap(), "@T")
    }

    #[test]
    fn default_rom_tftp_boot_with_disk() {
        let (c, t) = cfg(|t, o| {
            o.state_dir = t.join("state");
            o.qemu_img = o.qemu.clone();
            o.no_disk = false;
        });
        assert_eq!(
            golden(build(&c, Accel::Kvm, &FdPlan::new(None)), &t),
            "@T/qemu-system-x86_64 -name ec-ipxe-qemu -nodefaults -no-user-config -display none \
             -machine pc,graphics=off -accel kvm -cpu host -m 2048 -smp 2 \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -action panic=exit-failure -device pvpanic \
             -chardev socket,id=ec-launcher-qmp,fd=3 -mon chardev=ec-launcher-qmp,mode=control \
             -qmp unix:@T/state/qmp.sock,server=on,wait=off \
             -chardev socket,id=serial0,fd=4 -serial chardev:serial0 \
             -netdev user,id=boot,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,\
             tftp=@T/state/tftp,bootfile=boot.ipxe \
             -device virtio-net-pci,netdev=boot,addr=0x3,bootindex=1 \
             -drive if=none,id=disk0,file=@T/state/disk.qcow2,format=qcow2,discard=unmap \
             -device virtio-blk-pci,drive=disk0,addr=0x5"
        );
    }

    #[test]
    fn ipxe_image_hostfwd_hostname_no_disk_tcg_extra() {
        let (c, t) = cfg(|t, o| {
            o.ipxe = Some(t.join("ipxe.lkrn"));
            o.hostname = Some("pub1".parse().unwrap());
            o.host_forwards = vec!["tcp:127.0.0.1:2222-:22".parse().unwrap(), "udp::5353-:53".parse().unwrap()];
            o.memory = "512".parse().unwrap();
            o.cpus = 1;
            o.boot_nic_model = "e1000".parse().unwrap();
            o.serial_log = Some(t.join("console.log"));
            o.extra = ["-S", "-device", "virtio-rng-pci"].map(String::from).into();
        });
        assert_eq!(
            golden(build(&c, Accel::Tcg, &FdPlan::new(None)), &t),
            "@T/qemu-system-x86_64 -name ec-ipxe-qemu -nodefaults -no-user-config -display none \
             -machine pc,graphics=off -accel tcg -cpu max -m 512 -smp 1 \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -action panic=exit-failure -device pvpanic \
             -chardev socket,id=ec-launcher-qmp,fd=3 -mon chardev=ec-launcher-qmp,mode=control \
             -qmp unix:@T/s/qmp.sock,server=on,wait=off \
             -chardev socket,id=serial0,fd=4 -serial chardev:serial0 \
             -netdev user,id=boot,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,\
             hostname=pub1,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-:53 \
             -device e1000,netdev=boot,addr=0x3,romfile= \
             -kernel @T/ipxe.lkrn -initrd @T/s/tftp/boot.ipxe -S -device virtio-rng-pci"
        );
    }

    #[test]
    fn lan_nic_single_and_multi_queue() {
        let mac: MacAddr = "02:11:22:33:44:55".parse().unwrap();
        let (c, t) = cfg(|_, o| o.lan_interface = Some("ec-lan0".parse().unwrap()));
        let one = golden(build(&c, Accel::Tcg, &FdPlan::new(Some((mac, 1, 0)))), &t);
        assert!(
            one.contains("-chardev socket,id=ec-launcher-qmp,fd=4 ")
                && one.ends_with(
                    "-device virtio-net-pci,netdev=boot,addr=0x3,bootindex=1 -netdev tap,id=lan,fd=3 \
                 -device virtio-net-pci,netdev=lan,mac=02:11:22:33:44:55,romfile=,addr=0x4"
                ),
            "{one}"
        );
        let (c, t) = cfg(|_, o| {
            o.lan_interface = Some("ec-lan0".parse().unwrap());
            o.lan_queues = 3;
        });
        let three = golden(build(&c, Accel::Tcg, &FdPlan::new(Some((mac, 3, 0)))), &t);
        assert!(
            three.contains("-chardev socket,id=ec-launcher-qmp,fd=6 ")
                && three.ends_with(
                    "-netdev tap,id=lan,fds=3:4:5 \
                 -device virtio-net-pci,netdev=lan,mac=02:11:22:33:44:55,romfile=,addr=0x4,mq=on,vectors=8"
                ),
            "{three}"
        );
    }

    /// vhost-net: one `/dev/vhost-net` fd per queue after the tap fds, paired the way QEMU wants
    /// (`fd=` with `vhostfd=`, `fds=` with `vhostfds=`); the launcher's QMP fd comes after them.
    #[test]
    fn lan_nic_with_vhost_fds() {
        let mac: MacAddr = "02:11:22:33:44:55".parse().unwrap();
        let (c, t) = cfg(|_, o| o.lan_interface = Some("ec-lan0".parse().unwrap()));
        let one = golden(build(&c, Accel::Tcg, &FdPlan::new(Some((mac, 1, 1)))), &t);
        assert!(
            one.contains("-chardev socket,id=ec-launcher-qmp,fd=5 ")
                && one.ends_with(
                    "-netdev tap,id=lan,fd=3,vhost=on,vhostfd=4 \
                     -device virtio-net-pci,netdev=lan,mac=02:11:22:33:44:55,romfile=,addr=0x4"
                ),
            "{one}"
        );
        let (c, t) = cfg(|_, o| {
            o.lan_interface = Some("ec-lan0".parse().unwrap());
            o.lan_queues = 2;
        });
        let plan = FdPlan::new(Some((mac, 2, 2)));
        assert_eq!(
            plan,
            FdPlan { lan: Some(LanNicFds { mac, taps: vec![3, 4], vhost: vec![5, 6] }), qmp: 7, serial: 8 }
        );
        let two = golden(build(&c, Accel::Tcg, &plan), &t);
        assert!(
            two.contains("-chardev socket,id=ec-launcher-qmp,fd=7 ")
                && two.ends_with(
                    "-netdev tap,id=lan,fds=3:4,vhost=on,vhostfds=5:6 \
                     -device virtio-net-pci,netdev=lan,mac=02:11:22:33:44:55,romfile=,addr=0x4,mq=on,vectors=6"
                ),
            "{two}"
        );
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let (c, t) = cfg(|t, o| o.state_dir = PathBuf::from(format!("{}/a,b", t.display())));
        let args = build(&c, Accel::Tcg, &FdPlan::new(None));
        let g = golden(args, &t);
        assert!(g.contains("-qmp unix:@T/a,,b/qmp.sock,server=on,wait=off"), "{g}");
        assert!(g.contains("tftp=@T/a,,b/tftp,bootfile=boot.ipxe"), "{g}");
    }

    #[test]
    fn credentials_are_fw_cfg_files_named_and_read_by_qemu_before_the_extra_args() {
        use crate::launcher::credentials::CredentialArg;
        let (c, t) = cfg(|t, o| {
            std::fs::create_dir(t.join("k,d")).unwrap();
            std::fs::write(t.join("k,d/mesh"), b"SECRET-VALUE").unwrap();
            std::fs::create_dir(t.join("creds")).unwrap();
            std::fs::write(t.join("creds/ec.tuners"), b"192.168.1.20\n").unwrap();
            o.credentials = vec![CredentialArg { name: "mesh,key".parse().unwrap(), path: t.join("k,d/mesh") }];
            o.credentials_from = Some(t.join("creds"));
            o.extra = vec!["-S".into()];
        });
        let args = build(&c, Accel::Tcg, &FdPlan::new(None));
        assert!(!args.iter().any(|a| a.contains("SECRET")), "{args:?}");
        let g = golden(args, &t);
        assert!(
            g.ends_with(
                "-fw_cfg name=opt/io.systemd.credentials/ec.tuners,file=@T/creds/ec.tuners \
                 -fw_cfg name=opt/io.systemd.credentials/mesh,,key,file=@T/k,,d/mesh -S"
            ),
            "{g}"
        );
    }
}
