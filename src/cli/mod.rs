//! clap derive types only: what each binary accepts. The work is in `commands` and the library.

pub mod launcher;
pub mod macvtap;
