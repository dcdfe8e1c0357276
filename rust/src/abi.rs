//! Kernel ABI structs shared by the library (`sys`) and the standalone nsfast-init binary
//! (which build.rs compiles on its own and includes this file into with `#[path]`): plain
//! `#[repr(C)]` data, no dependencies.
#![allow(dead_code)]

/// `struct clone_args` of clone3(2), version 2 (with `set_tid` and `cgroup`).
#[repr(C)]
#[derive(Default, Debug)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `struct __user_cap_header_struct` (capget/capset).
#[repr(C)]
pub struct CapHeader {
    pub version: u32,
    pub pid: i32,
}

/// `struct __user_cap_data_struct`, two of them for version 3.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

/// _LINUX_CAPABILITY_VERSION_3.
pub const CAP_VERSION_3: u32 = 0x2008_0522;
