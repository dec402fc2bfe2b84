//! systemd credentials for the guest: the name rule, the `NAME=FILE` argument, collecting a directory, and the
//! checks `run`, `print-args` and `doctor` make before anything is started or created.
//!
//! Each credential travels as the QEMU fw_cfg file `opt/io.systemd.credentials/NAME`, which a systemd ≥ 252 guest
//! imports as a system credential. QEMU reads the file itself (`-fw_cfg name=...,file=PATH`, built by
//! [`qemu_args`](super::qemu_args)). The launcher never reads a value: it opens each file once, as its own user
//! (the user QEMU runs as), to check that it can be read, and takes the size from that open file. So no value
//! can reach an argv, a log line, `serial.log`, `status.json` or `print-args`; names, paths and sizes are not
//! secret and may appear.
//!
//! Limits:
//! - a name follows systemd's `credential_name_valid()` (a valid file name and fd name: not empty, not `.` or
//!   `..`, printable ASCII without `/` or `:`) and fits QEMU's fw_cfg names (at most 55 bytes,
//!   `FW_CFG_MAX_FILE_PATH` 56 with its NUL), so at most [`NAME_MAX`] = 28 bytes;
//! - a value is at most [`SIZE_MAX`] (1 MiB, systemd's `CREDENTIAL_SIZE_MAX`), and all values together at most
//!   [`TOTAL_SIZE_MAX`] (1 MiB, systemd's `CREDENTIALS_TOTAL_SIZE_MAX`): the guest's systemd skips, with only a
//!   warning in the guest, whatever goes over either;
//! - at most [`COUNT_MAX`] credentials: QEMU's `pc` machine has 32 fw_cfg file slots and uses about 13 of them
//!   itself; QEMU 7.2 aborts (an assertion, exit 134) when they run out, at 20 credentials.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Kind, Result};

/// The fw_cfg directory a systemd guest imports credentials from.
pub(crate) const FW_CFG_PREFIX: &str = "opt/io.systemd.credentials/";
/// QEMU's longest fw_cfg file name (`FW_CFG_MAX_FILE_PATH` minus its NUL): "name too long (max. 55 char)".
pub(crate) const FW_CFG_NAME_MAX: usize = 55;
/// The longest credential name: what is left of [`FW_CFG_NAME_MAX`] after [`FW_CFG_PREFIX`].
pub(crate) const NAME_MAX: usize = FW_CFG_NAME_MAX - FW_CFG_PREFIX.len();
/// The largest value: systemd's `CREDENTIAL_SIZE_MAX`.
pub(crate) const SIZE_MAX: u64 = 1024 * 1024;
/// The most all values may hold together: systemd's `CREDENTIALS_TOTAL_SIZE_MAX`.
pub(crate) const TOTAL_SIZE_MAX: u64 = 1024 * 1024;
/// The most credentials one guest gets (QEMU's fw_cfg file slots run out at 20).
pub(crate) const COUNT_MAX: usize = 16;
/// Where systemd puts a unit's credentials (`LoadCredential=`, `SetCredential=`, `ImportCredential=`); the
/// CLI's default for `--credentials-from`.
pub(crate) const ENV_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// A credential name: systemd's rule plus the fw_cfg length limit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CredentialName(String);

impl CredentialName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The fw_cfg file name the guest finds it under.
    pub(crate) fn fw_cfg_name(&self) -> String {
        format!("{FW_CFG_PREFIX}{}", self.0)
    }
}

impl FromStr for CredentialName {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let shown = s.escape_default();
        if s.is_empty() {
            return Err("credential name is empty".into());
        }
        if s == "." || s == ".." {
            return Err(format!("credential name \"{s}\" is not allowed"));
        }
        if let Some(c) = s.chars().find(|c| matches!(c, '/' | ':') || !(' '..='~').contains(c)) {
            return Err(format!(
                "credential name \"{shown}\" contains {c:?} (printable ASCII without '/' or ':' only)"
            ));
        }
        if s.len() > NAME_MAX {
            return Err(format!(
                "credential name \"{shown}\" is {} bytes long (at most {NAME_MAX}: QEMU's fw_cfg name \
                 {FW_CFG_PREFIX}NAME has at most {FW_CFG_NAME_MAX})",
                s.len()
            ));
        }
        Ok(CredentialName(s.to_owned()))
    }
}

impl fmt::Display for CredentialName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `--credential NAME=FILE`, as given: split at the first `=` (so a name with `=` in it can only come from
/// `--credentials-from`). The file is checked later, by [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialArg {
    pub name: CredentialName,
    pub path: PathBuf,
}

impl FromStr for CredentialArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let Some((name, path)) = s.split_once('=') else {
            return Err(format!("\"{}\" is not NAME=FILE", s.escape_default()));
        };
        let name: CredentialName = name.parse()?;
        if path.is_empty() {
            return Err(format!("credential \"{name}\": the file is empty (NAME=FILE)"));
        }
        Ok(CredentialArg { name, path: PathBuf::from(path) })
    }
}

/// One checked credential: the name, the absolute path QEMU reads, and the size the file had when checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Credential {
    pub(crate) name: CredentialName,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
}

/// The names, in order (for `status.json`).
pub(crate) fn names(creds: &[Credential]) -> Vec<String> {
    creds.iter().map(|c| c.name.0.clone()).collect()
}

/// One log line with the names and sizes (`run` and `print-args`); nothing when there are none.
pub(crate) fn log(creds: &[Credential]) {
    if !creds.is_empty() {
        tracing::info!("credentials for the guest (fw_cfg {FW_CFG_PREFIX}NAME): {}", describe(creds));
    }
}

/// `NAME (SIZE bytes)` for each, for one log line: names and sizes, never a value.
pub(crate) fn describe(creds: &[Credential]) -> String {
    let parts: Vec<String> = creds.iter().map(|c| format!("{} ({} bytes)", c.name, c.size)).collect();
    parts.join(", ")
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Every regular file in `dir`, as `NAME=FILE` pairs sorted by name. Entries that are not regular files
/// (directories, symlinks, sockets, ...) are skipped with a warning: symlinks are not followed, and systemd's
/// `$CREDENTIALS_DIRECTORY` holds only regular files. A file whose name is not a valid credential name is
/// exit 2; a missing directory exit 2, an unreadable one exit 5.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<CredentialArg>> {
    let what = format!("credentials directory \"{}\"", show(dir));
    let entries = std::fs::read_dir(dir).map_err(|e| open_error(&what, &e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| open_error(&what, &e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            return Err(Error::invalid(
                format!("{what}: {file_name:?}"),
                "the file name is not valid UTF-8, so not a credential name",
            ));
        };
        let kind = entry.file_type().map_err(|e| open_error(&format!("{what}: \"{name}\""), &e))?;
        if !kind.is_file() {
            tracing::warn!("{what}: skipping \"{}\": not a regular file", name.escape_default());
            continue;
        }
        let name: CredentialName = name.parse().map_err(|e: String| Error::invalid(what.clone(), e))?;
        out.push(CredentialArg { name, path: entry.path() });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Missing (or a path through a non-directory) is a usage error (exit 2); permission denied exit 5.
fn open_error(what: &str, e: &io::Error) -> Error {
    let kind = match e.raw_os_error().map(Kind::from_errno) {
        Some(Kind::Permission) => Kind::Permission,
        _ => Kind::Usage,
    };
    let reason = match e.kind() {
        io::ErrorKind::NotFound => "does not exist".to_string(),
        io::ErrorKind::PermissionDenied => "is not readable by this user (permission denied)".to_string(),
        _ => e.to_string(),
    };
    Error::unusable(kind, what, reason)
}

/// Check every credential: no name twice, at most [`COUNT_MAX`], each file an existing regular file this
/// process can open for reading and no larger than [`SIZE_MAX`], all together no larger than
/// [`TOTAL_SIZE_MAX`]. Bad input is exit 2, permission denied exit 5. Returns them sorted by name.
pub(crate) fn check(args: Vec<CredentialArg>) -> Result<Vec<Credential>> {
    let mut by_name: BTreeMap<CredentialName, PathBuf> = BTreeMap::new();
    for a in args {
        if let Some(first) = by_name.get(&a.name) {
            return Err(Error::invalid(
                format!("credential \"{}\"", a.name),
                format!("is given twice (\"{}\" and \"{}\")", show(first), show(&a.path)),
            ));
        }
        by_name.insert(a.name, a.path);
    }
    if by_name.len() > COUNT_MAX {
        return Err(Error::invalid(
            "credentials",
            format!("{} given, at most {COUNT_MAX} (QEMU's fw_cfg has no room for more)", by_name.len()),
        ));
    }
    let mut out = Vec::with_capacity(by_name.len());
    let mut total: u64 = 0;
    for (name, path) in by_name {
        let c = check_one(name, &path)?;
        total = total.saturating_add(c.size);
        out.push(c);
    }
    if total > TOTAL_SIZE_MAX {
        return Err(Error::invalid(
            "credentials",
            format!(
                "hold {total} bytes together ({}), at most {TOTAL_SIZE_MAX} (the guest's systemd would skip the rest)",
                describe(&out)
            ),
        ));
    }
    Ok(out)
}

fn check_one(name: CredentialName, path: &Path) -> Result<Credential> {
    let what = format!("credential \"{name}\" file \"{}\"", show(path));
    if path.to_str().is_none() {
        return Err(Error::invalid(format!("credential \"{name}\" file {path:?}"), "is not valid UTF-8"));
    }
    let path = std::path::absolute(path).map_err(|e| Error::invalid(what.clone(), e.to_string()))?;
    // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below as not a regular file.
    let file = File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| open_error(&what, &e))?;
    let meta = file.metadata().map_err(|e| open_error(&what, &e))?;
    if !meta.is_file() {
        return Err(Error::invalid(what, "is not a regular file"));
    }
    if meta.len() > SIZE_MAX {
        return Err(Error::invalid(
            what,
            format!("holds {} bytes, at most {SIZE_MAX} (systemd's limit for one credential)", meta.len()),
        ));
    }
    Ok(Credential { name, path, size: meta.len() })
}

/// [`list_dir`] (when there is a directory) and [`check`] together: everything `run` passes to QEMU.
pub(crate) fn collect(explicit: &[CredentialArg], dir: Option<&Path>) -> Result<Vec<Credential>> {
    let mut all = explicit.to_vec();
    if let Some(d) = dir {
        all.extend(list_dir(d)?);
    }
    check(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn name(s: &str) -> CredentialName {
        s.parse().unwrap()
    }

    #[test]
    fn the_name_limit_is_28_bytes() {
        assert_eq!(NAME_MAX, 28);
        assert_eq!(name(&"a".repeat(28)).fw_cfg_name().len(), FW_CFG_NAME_MAX);
        let e = "a".repeat(29).parse::<CredentialName>().unwrap_err();
        assert!(e.contains("29 bytes long (at most 28"), "{e}");
    }

    #[test]
    fn names_follow_systemd() {
        for ok in ["ec.tuners", "mesh-key", "a", "with space", "a=b", "a,b", ".hidden", "...", "~!@#$%^&*()"] {
            assert_eq!(name(ok).as_str(), ok);
        }
        for (bad, says) in [
            ("", "is empty"),
            (".", "not allowed"),
            ("..", "not allowed"),
            ("a/b", "contains '/'"),
            ("a:b", "contains ':'"),
            ("tab\there", "contains '\\t'"),
            ("nl\n", "contains '\\n'"),
            ("del\u{7f}", "contains '\\u{7f}'"),
            ("é", "contains 'é'"),
        ] {
            let e = bad.parse::<CredentialName>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn name_equals_file() {
        let a: CredentialArg = "mesh-key=/run/keys/k=1".parse().unwrap();
        assert_eq!(a.name.as_str(), "mesh-key");
        assert_eq!(a.path, PathBuf::from("/run/keys/k=1"));
        assert!("mesh-key".parse::<CredentialArg>().unwrap_err().contains("is not NAME=FILE"));
        assert!("k=".parse::<CredentialArg>().unwrap_err().contains("the file is empty"));
        assert!("=f".parse::<CredentialArg>().unwrap_err().contains("is empty"));
        assert!("a/b=f".parse::<CredentialArg>().unwrap_err().contains("contains '/'"));
    }

    #[test]
    fn names_and_sizes_only() {
        let c = vec![
            Credential { name: name("a,b"), path: PathBuf::from("/k,eys/a"), size: 3 },
            Credential { name: name("ec.tuners"), path: PathBuf::from("/t"), size: 12 },
        ];
        assert_eq!(describe(&c), "a,b (3 bytes), ec.tuners (12 bytes)");
        assert_eq!(serde_json::to_string(&names(&c)).unwrap(), r#"["a,b","ec.tuners"]"#);
    }

    fn write(dir: &Path, file: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(file);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn arg(n: &str, p: &Path) -> CredentialArg {
        CredentialArg { name: name(n), path: p.to_path_buf() }
    }

    #[test]
    fn check_sorts_sizes_and_makes_paths_absolute() {
        let tmp = tempfile::tempdir().unwrap();
        let b = write(tmp.path(), "b", b"hello");
        let a = write(tmp.path(), "a", b"");
        let got = check(vec![arg("zz", &b), arg("aa", &a)]).unwrap();
        assert_eq!(got[0], Credential { name: name("aa"), path: a, size: 0 });
        assert_eq!(got[1], Credential { name: name("zz"), path: b, size: 5 });

        // A relative path is made absolute against the current directory (QEMU gets absolute paths).
        let rel = check(vec![arg("r", Path::new("Cargo.toml"))]).unwrap();
        assert!(rel[0].path.is_absolute() && rel[0].path.ends_with("Cargo.toml"), "{:?}", rel[0].path);
    }

    #[test]
    fn check_refuses_with_the_documented_exit_codes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = write(tmp.path(), "f", b"x");
        let kind = |args: Vec<CredentialArg>| {
            let e = check(args).unwrap_err();
            (e.kind(), e.to_string())
        };

        let (k, m) = kind(vec![arg("k", &tmp.path().join("missing"))]);
        assert_eq!(k, Kind::Usage);
        assert!(m.starts_with("credential \"k\" file \"") && m.ends_with("missing\": does not exist"), "{m}");

        let (k, m) = kind(vec![arg("k", &f.join("below-a-file"))]);
        assert_eq!(k, Kind::Usage, "{m}");

        let (k, m) = kind(vec![arg("k", tmp.path())]);
        assert_eq!((k, m.ends_with("is not a regular file")), (Kind::Usage, true), "{m}");

        let (k, m) = kind(vec![arg("k", &f), arg("k", &f)]);
        assert_eq!(k, Kind::Usage);
        assert!(m.contains("credential \"k\": is given twice"), "{m}");

        let big = write(tmp.path(), "big", &vec![0u8; SIZE_MAX as usize + 1]);
        let (k, m) = kind(vec![arg("big", &big)]);
        assert_eq!(k, Kind::Usage);
        assert!(m.contains("holds 1048577 bytes, at most 1048576"), "{m}");

        let half = write(tmp.path(), "half", &vec![0u8; SIZE_MAX as usize / 2 + 1]);
        let (k, m) = kind(vec![arg("h1", &half), arg("h2", &half)]);
        assert_eq!(k, Kind::Usage);
        assert!(m.starts_with("credentials: hold 1048578 bytes together (h1 (524289 bytes), h2"), "{m}");
        // Exactly the limit is fine.
        let exact = write(tmp.path(), "exact", &vec![0u8; SIZE_MAX as usize]);
        assert_eq!(check(vec![arg("e", &exact)]).unwrap()[0].size, SIZE_MAX);

        let many: Vec<CredentialArg> = (0..=COUNT_MAX).map(|i| arg(&format!("c{i}"), &f)).collect();
        let (k, m) = kind(many);
        assert_eq!(k, Kind::Usage);
        assert!(m.contains("17 given, at most 16"), "{m}");
        let enough: Vec<CredentialArg> = (0..COUNT_MAX).map(|i| arg(&format!("c{i}"), &f)).collect();
        assert_eq!(check(enough).unwrap().len(), COUNT_MAX);
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = check(vec![arg("f", &fifo)]).unwrap_err();
        assert_eq!(e.kind(), Kind::Usage);
        assert!(e.to_string().ends_with("is not a regular file"), "{e}");
    }

    #[test]
    fn permission_denied_is_exit_5() {
        // Root reads any file, so this needs a user without CAP_DAC_OVERRIDE; the root-only end-to-end test
        // covers it as `nobody`.
        if nix::unistd::geteuid().is_root() {
            let e = open_error("credential \"k\" file \"/x\"", &io::Error::from_raw_os_error(nix::libc::EACCES));
            assert_eq!(e.kind(), Kind::Permission);
            assert_eq!(e.to_string(), "credential \"k\" file \"/x\": is not readable by this user (permission denied)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let f = write(tmp.path(), "f", b"x");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
        let e = check(vec![arg("k", &f)]).unwrap_err();
        assert_eq!(e.kind(), Kind::Permission, "{e}");
    }

    #[test]
    fn a_directory_gives_its_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "ec.tuners", b"192.168.1.20\n");
        write(tmp.path(), "mesh-key", b"k");
        std::fs::create_dir(tmp.path().join("subdir")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("mesh-key"), tmp.path().join("link")).unwrap();
        let got = list_dir(tmp.path()).unwrap();
        let names: Vec<&str> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["ec.tuners", "mesh-key"]);
        assert_eq!(got[1].path, tmp.path().join("mesh-key"));

        let all = collect(&[arg("x", &tmp.path().join("mesh-key"))], Some(tmp.path())).unwrap();
        assert_eq!(all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["ec.tuners", "mesh-key", "x"]);
        // The same name from both places is refused.
        let e = collect(&[arg("mesh-key", &tmp.path().join("mesh-key"))], Some(tmp.path())).unwrap_err();
        assert!(e.to_string().contains("is given twice"), "{e}");
    }

    #[test]
    fn a_directory_with_a_bad_name_or_missing_is_exit_2() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &"n".repeat(29), b"x");
        let e = list_dir(tmp.path()).unwrap_err();
        assert_eq!(e.kind(), Kind::Usage);
        assert!(e.to_string().contains("is 29 bytes long"), "{e}");

        let e = list_dir(&tmp.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), Kind::Usage);
        assert!(e.to_string().ends_with("missing\": does not exist"), "{e}");

        let f = write(tmp.path(), "file", b"x");
        let e = list_dir(&f).unwrap_err();
        assert_eq!(e.kind(), Kind::Usage, "{e}");
    }
}
