//! One error type for the library and both binaries, and the one place that maps errno to meaning.

use std::io;

use serde::Serialize;

/// What a failure means to the caller; each kind has a documented exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// 1: the operation failed at run time.
    Runtime,
    /// 2: usage error or invalid input.
    Usage,
    /// 3: something named does not exist.
    NotFound,
    /// 4: exists, foreign, different or busy.
    Conflict,
    /// 5: permission denied.
    Permission,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Runtime => 1,
            Kind::Usage => 2,
            Kind::NotFound => 3,
            Kind::Conflict => 4,
            Kind::Permission => 5,
        }
    }

    /// The errno table: what a kernel error means for the caller.
    pub fn from_errno(errno: i32) -> Kind {
        use nix::errno::Errno;
        match Errno::from_raw(errno) {
            Errno::ENODEV | Errno::ENOENT | Errno::ENXIO => Kind::NotFound,
            Errno::EEXIST | Errno::EADDRINUSE | Errno::EBUSY | Errno::ENOTEMPTY => Kind::Conflict,
            Errno::EPERM | Errno::EACCES => Kind::Permission,
            Errno::EINVAL | Errno::ERANGE | Errno::EOPNOTSUPP | Errno::EAFNOSUPPORT => Kind::Usage,
            _ => Kind::Runtime,
        }
    }
}

/// A hint appended to kernel errors that people commonly hit.
fn errno_hint(errno: i32) -> &'static str {
    use nix::errno::Errno;
    match Errno::from_raw(errno) {
        Errno::EPERM => " (needs CAP_NET_ADMIN: run as root or give the capability)",
        Errno::EACCES => " (permission denied: check the owner of the device node or run as root)",
        Errno::EADDRINUSE => " (another macvlan/macvtap on that parent already uses this MAC)",
        Errno::EBUSY => " (the device is busy)",
        _ => "",
    }
}

fn errno_text(errno: i32) -> String {
    format!("{}{}", nix::errno::Errno::from_raw(errno).desc(), errno_hint(errno))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid input: a bad name, value or combination (exit 2).
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },

    /// Something named is missing (exit 3).
    #[error("{what}: not found")]
    NotFound { what: String },

    /// Exists, foreign, different or locked (exit 4).
    #[error("{what}: {reason}")]
    Conflict { what: String, reason: String },

    /// The kernel refused a netlink request; `errno` decides the kind.
    #[error("{op}: {}", errno_text(*.errno))]
    Netlink { op: String, errno: i32 },

    /// Any other failing system call or file operation.
    #[error("{op}: {source}{}", io_hint(.source))]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },

    /// Anything else that failed at run time (exit 1).
    #[error("{0}")]
    Runtime(String),

    /// Something that cannot be used, with a reason in plain words and the kind the caller needs (e.g. a
    /// device that is missing, exit 3, or refused, exit 5, where errno alone would mislead).
    #[error("{what}: {reason}")]
    Unusable { kind: Kind, what: String, reason: String },
}

fn io_hint(e: &io::Error) -> &'static str {
    e.raw_os_error().map(errno_hint).unwrap_or("")
}

impl Error {
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), reason: reason.into() }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    pub fn conflict(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Conflict { what: what.into(), reason: reason.into() }
    }

    pub fn unusable(kind: Kind, what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Unusable { kind, what: what.into(), reason: reason.into() }
    }

    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        Error::Io { op: op.into(), source }
    }

    pub fn errno(op: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::Io { op: op.into(), source: io::Error::from_raw_os_error(errno as i32) }
    }

    /// Wrap an rtnetlink error without Debug-printing it (which dumps raw bytes).
    pub fn netlink(op: impl Into<String>, err: rtnetlink::Error) -> Self {
        let op = op.into();
        match err {
            rtnetlink::Error::NetlinkError(msg) => Error::Netlink { op, errno: -msg.raw_code() },
            other => Error::Runtime(format!("{op}: {other}")),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Error::Invalid { .. } => Kind::Usage,
            Error::NotFound { .. } => Kind::NotFound,
            Error::Conflict { .. } => Kind::Conflict,
            Error::Netlink { errno, .. } => Kind::from_errno(*errno),
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(errno) => match Kind::from_errno(errno) {
                    // A missing file is "not found"; EINVAL from a syscall is a runtime failure.
                    Kind::Usage => Kind::Runtime,
                    k => k,
                },
                None => Kind::Runtime,
            },
            Error::Runtime(_) => Kind::Runtime,
            Error::Unusable { kind, .. } => *kind,
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.kind().exit_code()
    }

    /// The netlink errno, when the kernel refused a request.
    pub fn netlink_errno(&self) -> Option<i32> {
        match self {
            Error::Netlink { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// `{"error": {"kind": ..., "code": ..., "message": ...}}` for `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "kind": self.kind(),
                "code": self.exit_code(),
                "message": self.to_string(),
            }
        })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    #[test]
    fn errno_table() {
        assert_eq!(Kind::from_errno(Errno::ENODEV as i32), Kind::NotFound);
        assert_eq!(Kind::from_errno(Errno::EEXIST as i32), Kind::Conflict);
        assert_eq!(Kind::from_errno(Errno::EADDRINUSE as i32), Kind::Conflict);
        assert_eq!(Kind::from_errno(Errno::EBUSY as i32), Kind::Conflict);
        assert_eq!(Kind::from_errno(Errno::EPERM as i32), Kind::Permission);
        assert_eq!(Kind::from_errno(Errno::EACCES as i32), Kind::Permission);
        assert_eq!(Kind::from_errno(Errno::EINVAL as i32), Kind::Usage);
        assert_eq!(Kind::from_errno(Errno::EIO as i32), Kind::Runtime);
        let codes: Vec<u8> = [Kind::Runtime, Kind::Usage, Kind::NotFound, Kind::Conflict, Kind::Permission]
            .iter()
            .map(|k| k.exit_code())
            .collect();
        assert_eq!(codes, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn netlink_errors_say_what_and_why() {
        let e = Error::Netlink { op: "create macvtap \"ec-lan0\" on \"eno1\"".into(), errno: Errno::EPERM as i32 };
        assert_eq!(e.exit_code(), 5);
        assert_eq!(
            e.to_string(),
            "create macvtap \"ec-lan0\" on \"eno1\": Operation not permitted (needs CAP_NET_ADMIN: run as root or give the capability)"
        );
        let e = Error::Netlink { op: "x".into(), errno: Errno::EADDRINUSE as i32 };
        assert_eq!(e.exit_code(), 4);
        assert!(e.to_string().contains("already uses this MAC"));
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let e = Error::io("open \"/dev/tap9\"", io::Error::from_raw_os_error(Errno::ENOENT as i32));
        assert_eq!(e.exit_code(), 3);
        let e = Error::io("open \"/dev/tap9\"", io::Error::from_raw_os_error(Errno::EACCES as i32));
        assert_eq!(e.exit_code(), 5);
        let e = Error::io("ioctl", io::Error::from_raw_os_error(Errno::EINVAL as i32));
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn json_shape() {
        let v = Error::conflict("link \"ec-lan0\"", "exists and is not managed by ec-macvtap").to_json();
        assert_eq!(v["error"]["kind"], "conflict");
        assert_eq!(v["error"]["code"], 4);
        assert_eq!(v["error"]["message"], "link \"ec-lan0\": exists and is not managed by ec-macvtap");
    }
}
