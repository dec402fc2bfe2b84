//! Fixtures of the issue-16 tests (`habitat_*.rs`): a snapshot of a directory tree to prove that nothing
//! outside the state directory changed, `--boot-dir` guests whose iPXE script floods the console or waits
//! for a key, a console client that types, and a small tmpfs that can be filled and freed.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::launcher::Run;

/// What a tree holds, entry by entry (symlinks not followed): kind, mode, owner, size, mtime and a hash of
/// the content of regular files.
#[derive(Debug, PartialEq, Eq)]
pub struct Tree(BTreeMap<PathBuf, String>);

impl Tree {
    /// `root` and everything under it, leaving out the paths in `skip` (and what is under them).
    pub fn of(root: &Path, skip: &[&Path]) -> Tree {
        let mut map = BTreeMap::new();
        walk(root, skip, &mut map);
        Tree(map)
    }

    /// Panic with the differences when `after` is not the same tree.
    pub fn assert_same(&self, after: &Tree, what: &str) {
        if self == after {
            return;
        }
        let mut diff = Vec::new();
        for (p, e) in &self.0 {
            match after.0.get(p) {
                None => diff.push(format!("removed {}", p.display())),
                Some(a) if a != e => diff.push(format!("changed {}: {e} -> {a}", p.display())),
                _ => {}
            }
        }
        for p in after.0.keys().filter(|p| !self.0.contains_key(*p)) {
            diff.push(format!("added {}", p.display()));
        }
        panic!("{what}: files outside the state directory changed:\n{}", diff.join("\n"));
    }
}

fn walk(p: &Path, skip: &[&Path], map: &mut BTreeMap<PathBuf, String>) {
    if skip.contains(&p) {
        return;
    }
    let Ok(m) = std::fs::symlink_metadata(p) else { return };
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        format!("link->{}", std::fs::read_link(p).map(|t| t.display().to_string()).unwrap_or_default())
    } else if ft.is_dir() {
        "dir".to_owned()
    } else if ft.is_file() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::fs::read(p).unwrap_or_default().hash(&mut h);
        format!("file#{:x}", h.finish())
    } else {
        "special".to_owned()
    };
    let mtime = if ft.is_dir() { 0 } else { m.mtime_nsec() + m.mtime() * 1_000_000_000 };
    map.insert(
        p.to_owned(),
        format!(
            "{kind} mode {:o} {}:{} len {} mtime {mtime}",
            m.mode(),
            m.uid(),
            m.gid(),
            if ft.is_dir() { 0 } else { m.len() }
        ),
    );
    if ft.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            walk(&e, skip, map);
        }
    }
}

/// A `--boot-dir` with `netboot.ipxe` = `script` (lines), under `parent/www`.
pub fn www(parent: &Path, script: &[String]) -> PathBuf {
    let dir = parent.join("www");
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::from("#!ipxe\n");
    for l in script {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(dir.join("netboot.ipxe"), text).unwrap();
    dir
}

/// iPXE script lines that print `lines` numbered lines `PREFIX I J ...` in bursts of 10, pausing `pause_ms`
/// after each burst (iPXE's `sleep` counts whole seconds; `prompt --timeout` waits milliseconds and prints
/// nothing). Under TCG on the development hosts, a pause of 40 ms gives about 100 lines/s.
pub fn flood(prefix: &str, lines: u32, pause_ms: u32) -> Vec<String> {
    assert_eq!(lines % 10, 0);
    let label = format!("fl{}", prefix.to_ascii_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), ""));
    let mut v = vec![format!("set i:int32 0"), format!(":{label}")];
    for k in 0..10 {
        v.push(format!("echo {prefix} ${{i}} {k} abcdefghijklmnopqrstuvwxyz0123456789"));
    }
    if pause_ms > 0 {
        v.push(format!("prompt --timeout {pause_ms} ||"));
    }
    v.push("inc i".into());
    v.push(format!("iseq ${{i}} {} || goto {label}", lines / 10));
    v
}

/// iPXE script lines: print `marker`, then wait for any key on the console.
pub fn wait_key(marker: &str) -> Vec<String> {
    vec![format!("echo {marker}"), "prompt ||".into()]
}

/// Type one key on the guest console through `console.sock` (the client holds the keyboard while connected,
/// so it stays connected; drop it to leave). A thread reads and discards what the console sends, so the
/// launcher never drops this client for not reading.
pub struct Keyboard(UnixStream);

impl Keyboard {
    pub fn connect(state: &Path) -> Keyboard {
        let s = UnixStream::connect(state.join("console.sock")).unwrap();
        let mut rd = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while matches!(rd.read(&mut buf), Ok(n) if n > 0) {}
        });
        Keyboard(s)
    }

    pub fn key(&mut self) {
        self.0.write_all(b"k").unwrap();
    }
}

impl Drop for Keyboard {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { dir: dir.to_owned() }
    }

    /// Fill the file system with `name` until writes fail (ENOSPC); returns its size.
    pub fn fill(&self, name: &str) -> u64 {
        let mut f = std::fs::File::create(self.dir.join(name)).unwrap();
        let chunk = vec![0x5au8; 4096];
        let mut n = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC), "filling: {e}");
                    break;
                }
            }
        }
        n
    }

    pub fn free(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A free TCP port on 127.0.0.1 (free now; good enough for a test's own server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// utime + stime of a process, in clock ticks, from /proc/PID/stat.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `Run::start` with the launcher's umask set to `umask` first (as a shell's `umask 000` would).
pub fn start_umask(state: &Path, args: &[&str], umask: u32) -> Run {
    start_with(state, args, umask, &state.with_extension("stderr"))
}

/// `Run::start` with a umask and the launcher's stderr in `log`.
pub fn start_with(state: &Path, args: &[&str], umask: u32, log: &Path) -> Run {
    use std::os::unix::process::CommandExt;
    let mut cmd = Run::command(None, state, "256", args);
    // SAFETY: umask(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::libc::umask(umask);
            Ok(())
        });
    }
    Run::spawn(cmd, state, log)
}
