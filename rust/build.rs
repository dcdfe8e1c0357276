//! Builds `init/main.rs` (with its modules `init/exec.rs`, `init/rt.rs`) into a static binary
//! without libc that the library embeds (see spawn.rs).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=init/main.rs");
    println!("cargo:rerun-if-changed=init/exec.rs");
    println!("cargo:rerun-if-changed=src/abi.rs");
    println!("cargo:rerun-if-changed=init/rt.rs");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("nsfast-init");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let status = Command::new(rustc)
        .args(["--edition=2021", "--crate-type=bin", "--crate-name=nsfast_init"])
        .args(["-C", "opt-level=s", "-C", "panic=abort", "-C", "strip=symbols", "-C", "codegen-units=1"])
        // No libc, no start files: rt.rs has the entry point and the few functions needed.
        .args(["-C", "relocation-model=static", "-C", "target-feature=+crt-static"])
        .args([
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-no-pie",
        ])
        .args(["--target", &target])
        // Cross builds (maturin --zig): the linker cargo uses for the target, for init too.
        .args(env::var("RUSTC_LINKER").map(|l| vec!["-C".to_string(), format!("linker={l}")]).unwrap_or_default())
        .arg("-o")
        .arg(&out)
        .arg("init/main.rs")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for nsfast-init");
    assert!(status.success(), "building nsfast-init failed");
}
