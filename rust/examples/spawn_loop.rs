//! The no-Python baseline of benches/start_latency.py: start `/bin/true` in a sandbox with
//! nsfast's default isolation and its per-sandbox cgroup (the same plan and system calls
//! as `nsfast.run(["/bin/true"])`), wait, measure and remove the cgroup, N times; print the
//! samples' median and p90 in microseconds as JSON.
//!
//!     cargo run --release --example spawn_loop -- 500 [NAMESPACES|default] [--no-cgroup]
//!
//! NAMESPACES is a comma-separated list (e.g. `pid,uts`) replacing the default set.

use std::os::fd::AsRawFd;
use std::time::Instant;

use nsfast::cgroup::{self, Limits};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let mut spec = nsfast::Spec::new(vec![b"/bin/true".to_vec()]);
    if let Some(names) = args.get(1).filter(|a| !a.starts_with("--") && *a != "default") {
        spec.namespaces = nsfast::ns::flags(names.split(',').filter(|n| !n.is_empty())).expect("namespace names");
    }
    let use_cgroup = !args.iter().any(|a| a == "--no-cgroup") && rustix::process::geteuid().is_root();
    let backend = use_cgroup.then(|| {
        let hierarchy = cgroup::detect().expect("a cgroup filesystem");
        cgroup::backend(&hierarchy, "nsfast").expect("cgroup backend")
    });
    let kill_tree = spec.namespaces & libc::CLONE_NEWPID as u64 == 0;
    let caller = nsfast::Caller::current();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let plan = nsfast::Plan::build(&spec, caller).expect("plan");
        let mut cg = backend.as_ref().map(|b| b.create(&cgroup::unique_name(), &Limits::default(), kill_tree).expect("cgroup"));
        let io = nsfast::Io { stdio: [-1; 3], pass_fds: &[], cgroup: cg.as_deref() };
        let child = nsfast::spawn(&plan, &io).expect("spawn");
        let (status, _) = nsfast::wait(child.pid, child.pidfd.as_raw_fd(), None).expect("wait").expect("no timeout");
        assert_eq!(status, 0, "/bin/true failed");
        if let Some(cg) = cg.as_mut() {
            if kill_tree {
                cg.kill().expect("kill");
            }
            let _ = cg.usage();
            cg.remove().expect("remove");
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!("{{\"n\": {n}, \"cgroup\": {use_cgroup}, \"median_us\": {:.1}, \"p90_us\": {:.1}}}", q(0.5), q(0.9));
}
