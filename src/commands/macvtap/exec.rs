use std::ffi::CString;

use crate::cli::macvtap::{ExecArgs, Global};
use crate::error::{Error, Kind, Result};
use crate::{macvtap, tap};

/// Replace `{fd}` with the first fd and `{fds}` with the colon-separated list.
pub fn substitute(args: &[String], fds: &[i32]) -> Vec<String> {
    let first = fds.first().map(|f| f.to_string()).unwrap_or_default();
    let all = fds.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(":");
    args.iter().map(|a| a.replace("{fds}", &all).replace("{fd}", &first)).collect()
}

pub fn run(global: &Global, args: &ExecArgs) -> Result<()> {
    let opened = macvtap::open(global.netns.as_ref(), &args.name, args.queues)?;
    tracing::debug!(node = %opened.node.display(), queues = args.queues, "opened and verified");
    let fds = tap::place_fds_for_exec(opened.fds, 3)?;
    let cargv = substitute(&args.program, &fds)
        .into_iter()
        .map(|a| CString::new(a.clone()).map_err(|_| Error::invalid(format!("argument {a:?}"), "contains a NUL byte")))
        .collect::<Result<Vec<_>>>()?;
    let program = &cargv[0];
    let err = match nix::unistd::execvp(program, &cargv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    Err(exec_error(&args.program[0], err))
}

/// What a failed `execvp` of `program` means, in words about the program (not about the tap node, which was
/// already opened).
fn exec_error(program: &str, err: nix::errno::Errno) -> Error {
    use nix::errno::Errno;
    let what = format!("program {program:?}");
    let not_runnable = |reason: &str| Error::unusable(Kind::Permission, what.clone(), reason.to_owned());
    match err {
        Errno::ENOENT => Error::not_found(what),
        Errno::EACCES => match std::fs::metadata(program) {
            Ok(m) if m.is_dir() => not_runnable("is a directory, not a program"),
            Ok(m) if !m.is_file() => not_runnable("is not a regular file, so it cannot be executed"),
            _ => not_runnable(
                "cannot be executed: permission denied (no execute permission, or on a noexec file system)",
            ),
        },
        Errno::ENOEXEC => not_runnable("is not an executable format the kernel can run"),
        Errno::EPERM => not_runnable("execution not permitted (a security module or a nosuid rule refused it)"),
        e => Error::errno(format!("exec {what}"), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        let a: Vec<String> = ["-netdev", "tap,id=lan,fd={fd}", "fds={fds}", "plain"].map(String::from).into();
        assert_eq!(substitute(&a, &[3]), ["-netdev", "tap,id=lan,fd=3", "fds=3", "plain"]);
        assert_eq!(substitute(&a, &[3, 4, 5])[2], "fds=3:4:5");
        assert_eq!(substitute(&a, &[3, 4, 5])[1], "tap,id=lan,fd=3");
    }
}
