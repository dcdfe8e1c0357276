//! nsfast core: Linux sandboxes started with one clone3.
//!
//! The modules below do the work and know nothing of Python; `py` (feature `python`) is the
//! only binding layer.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod abi;
pub mod cgroup;
pub mod error;
pub mod exec;
pub mod mount;
pub mod netpool;
pub mod ns;
pub mod reaper;
pub mod seccomp;
pub mod spare;
pub mod spawn;
pub mod spec;
pub mod sync;
pub mod sys;
pub mod zygote;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
pub use spawn::{spawn, wait, Child, Io};
pub use spec::{Caller, Mount, Plan, Spec};
