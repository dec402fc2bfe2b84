//! The real hand-off: `ec-macvtap exec` opens the macvtap's tap device and execs a real QEMU that owns a
//! tap netdev on that fd. QEMU is asked over QMP what it has, then told to quit.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{DeleteOnDrop, KillOnDrop, Netns, macvtap, require_programs, require_root, unique, wait_for};

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let stream = wait_for(Duration::from_secs(20), || UnixStream::connect(path).ok()).expect("QMP socket");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut q = Qmp { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.cmd(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Send a command and return its `return` value (skipping asynchronous events).
    fn cmd(&mut self, c: serde_json::Value) -> serde_json::Value {
        writeln!(self.writer, "{c}").unwrap();
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "{c} failed: {v}");
        }
    }

    fn hmp(&mut self, line: &str) -> String {
        let r = self.cmd(serde_json::json!({"execute": "human-monitor-command", "arguments": {"command-line": line}}));
        r.as_str().unwrap().to_owned()
    }
}

fn handoff(queues: u32) {
    let test = format!("qemu_owns_the_tap_fd_{queues}q");
    require_root(&test);
    if !require_programs(&test, &["qemu-system-x86_64"]) {
        return;
    }
    let ns = Netns::new("eq");
    let parent = unique("p");
    ns.veth(&parent, &unique("q"));
    let name = unique("mv");
    let _guard = DeleteOnDrop::new(&ns, &name);
    let created = macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &name]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let info: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let mac = info["mac"].as_str().unwrap().to_owned();
    let node = info["tap_device"].as_str().unwrap().to_owned();

    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("qmp.sock");
    let (netdev, device) = if queues == 1 {
        ("tap,id=lan,fd={fd}".to_owned(), format!("virtio-net-pci,netdev=lan,mac={mac},romfile="))
    } else {
        (
            "tap,id=lan,fds={fds}".to_owned(),
            format!("virtio-net-pci,netdev=lan,mac={mac},romfile=,mq=on,vectors={}", 2 * queues + 2),
        )
    };
    let qstr = queues.to_string();
    let child = Command::new(common::macvtap_bin())
        .args(["--netns", &ns.name, "exec", "--name", &name, "--queues", &qstr, "--"])
        .args(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64"])
        .args(["-netdev", &netdev, "-device", &device])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qemu = KillOnDrop(child);
    let pid = qemu.0.id();
    let mut qmp = Qmp::connect(&qmp_path);

    // exec replaced ec-macvtap: the process is QEMU, and its fds 3.. are the tap node.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.to_string_lossy().contains("qemu-system-x86_64"), "{}", exe.display());
    let node_rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&node).unwrap());
    for fd in 3..3 + queues {
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::rdev(&meta), node_rdev, "fd {fd} is not the tap of {node}");
    }

    let network = qmp.hmp("info network");
    assert!(network.contains("lan:") && network.contains("type=tap"), "{network}");
    assert!(network.contains(&mac), "guest NIC must carry the macvtap's MAC {mac}: {network}");
    // One tap backend per queue, on fds 3, 4, ...
    let backends: Vec<&str> = network.lines().filter(|l| l.contains("type=tap")).collect();
    assert_eq!(backends.len(), queues as usize, "{network}");
    for fd in 3..3 + queues {
        assert!(network.contains(&format!("fd={fd}")), "fd={fd} missing: {network}");
    }
    let k = ns.link_json(&name).unwrap();
    assert_eq!(k["address"], mac.as_str());

    writeln!(qmp.writer, "{}", serde_json::json!({"execute": "quit"})).unwrap();
    let status = wait_for(Duration::from_secs(20), || qemu.0.try_wait().unwrap()).expect("QEMU quit");
    assert!(status.success(), "QEMU exit {status:?}");
}

#[test]
#[ignore = "needs root"]
fn qemu_owns_the_tap_fd() {
    handoff(1);
}

#[test]
#[ignore = "needs root"]
fn qemu_owns_multiqueue_tap_fds() {
    handoff(2);
}

#[test]
#[ignore = "needs root"]
fn exec_refuses_a_missing_or_non_macvtap_link() {
    require_root("exec_refuses_a_missing_or_non_macvtap_link");
    let ns = Netns::new("eq");
    let parent = unique("p");
    ns.veth(&parent, &unique("q"));
    let out = macvtap(Some(&ns), &["exec", "--name", "ec-absent0", "--", "true"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = macvtap(Some(&ns), &["exec", "--name", &parent, "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a macvtap"));
}
