//! ec-ipxe-qemu: keep a QEMU guest running that netboots with iPXE over user-mode networking and,
//! optionally, sits on the host's LAN through a macvtap.
//!
//! The library holds everything the two binaries share: validated names ([`names`]), errors and exit codes
//! ([`error`]), link operations over rtnetlink ([`link`]), namespaces ([`netns`]), the tap device ([`tap`],
//! the only module with `unsafe`), where tap nodes live ([`nodedir`]), the macvtap lifecycle ([`macvtap`]) and the
//! launcher behind `ec-ipxe-qemu` (a private module: its map is docs/architecture.md).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bootcache;
pub mod cli;
pub mod commands;
pub mod error;
mod launcher;
pub mod link;
pub mod logging;
pub mod macvtap;
pub mod names;
pub mod netns;
pub mod nodedir;
pub(crate) mod probe;
pub mod tap;

pub use error::{Error, Kind, Result};
/// The LAN link watch, for its privileged test.
pub use launcher::{LinkEnd, LinkWatch};
