use std::ffi::CString;

use crate::cli::macvtap::{ExecArgs, Global};
use crate::error::{Error, Result};
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
    let what = format!("exec {:?}", args.program[0]);
    Err(match err {
        nix::errno::Errno::ENOENT => Error::not_found(format!("program {:?}", args.program[0])),
        e => Error::errno(what, e),
    })
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
