//! The no-Python baseline of benches/start_latency.py: start `/bin/true` in a sandbox with
//! nsfast's default isolation (the same plan and system calls as `nsfast.run`), wait for
//! it, N times; print the samples' median and p90 in microseconds as JSON.
//!
//!     cargo run --release --example spawn_loop -- 500

use std::time::Instant;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let mut spec = nsfast::Spec::new(vec![b"/bin/true".to_vec()]);
    // Optional: a comma-separated namespace list instead of the default (for experiments).
    if let Some(names) = std::env::args().nth(2) {
        spec.namespaces = nsfast::ns::flags(names.split(',').filter(|n| !n.is_empty())).expect("namespace names");
    }
    let caller = nsfast::Caller::current();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let plan = nsfast::Plan::build(&spec, caller).expect("plan");
        let child = nsfast::spawn(&plan, &nsfast::Io { stdio: [-1; 3], pass_fds: &[], cgroup: None }).expect("spawn");
        let (status, _) = nsfast::wait(child.pid, std::os::fd::AsRawFd::as_raw_fd(&child.pidfd), None)
            .expect("wait")
            .expect("no timeout");
        assert_eq!(status, 0, "/bin/true failed");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!("{{\"n\": {n}, \"median_us\": {:.1}, \"p90_us\": {:.1}}}", q(0.5), q(0.9));
}
