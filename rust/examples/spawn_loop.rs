//! The no-Python baseline of benches/start_latency.py: start `/bin/true` in a sandbox with
//! nsfast's default isolation, its default limits and its per-sandbox cgroup (the same plan
//! and system calls as `nsfast.run(["/bin/true"])`), wait, measure and remove the cgroup,
//! N times; print the samples' median and p90 in microseconds as JSON.
//!
//!     cargo run --release --example spawn_loop -- 500 [NAMESPACES|default] [FLAGS]
//!
//! NAMESPACES is a comma-separated list (e.g. `pid,uts`) replacing the default set. FLAGS turn
//! off one hardening step each, as the Python knobs do:
//!
//!     --no-userns    no user namespace        (a root caller's `namespaces` without "user")
//!     --no-seccomp   no seccomp filter        (`seccomp=None`)
//!     --no-masks     no masked, read-only or hidden paths
//!                                             (`masked_paths=(), readonly_paths=(), hidden=()`)
//!     --no-limits    no memory/pids limits    (`limits=None`; the cgroup stays)
//!     --no-cgroup    no per-sandbox cgroup    (`cgroup=False`)
//!     --no-init      the command as pid 1     (`init=False`; by default nsfast-init is pid 1
//!                                             when there is a pid namespace, as `init=None`)
//!     --init         nsfast-init even without a pid namespace (`init=True`)
//!
//! and `--warmup K` spawns K times untimed first; `--samples` adds every sample (in the order
//! taken) to the JSON, as "samples_us".

use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use nsfast::cgroup::{self, Limits};

/// `nsfast.DEFAULT_LIMITS` (python/nsfast/_cgroup.py): memory 1 GiB, pids 512.
fn default_limits() -> Limits {
    Limits { memory: Some(1 << 30), pids: Some(512), ..Limits::default() }
}

struct Options {
    n: usize,
    warmup: usize,
    namespaces: Option<String>,
    userns: bool,
    seccomp: bool,
    masks: bool,
    limits: bool,
    cgroup: bool,
    init: Option<bool>,
    samples: bool,
}

fn parse(args: &[String]) -> Options {
    let mut o = Options {
        n: 200,
        warmup: 0,
        namespaces: None,
        userns: true,
        seccomp: true,
        masks: true,
        limits: true,
        cgroup: true,
        init: None,
        samples: false,
    };
    let mut positional = 0;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-userns" => o.userns = false,
            "--no-seccomp" => o.seccomp = false,
            "--no-masks" => o.masks = false,
            "--no-limits" => o.limits = false,
            "--no-cgroup" => o.cgroup = false,
            "--init" => o.init = Some(true),
            "--no-init" => o.init = Some(false),
            "--samples" => o.samples = true,
            "--warmup" => o.warmup = it.next().and_then(|k| k.parse().ok()).expect("--warmup K"),
            flag if flag.starts_with("--") => panic!("unknown flag {flag}"),
            value => {
                match positional {
                    0 => o.n = value.parse().expect("N: a number of samples"),
                    1 if value != "default" => o.namespaces = Some(value.to_string()),
                    1 => {}
                    _ => panic!("unexpected argument {value}"),
                }
                positional += 1;
            }
        }
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse(&args);
    let mut spec = nsfast::Spec::new(vec![b"/bin/true".to_vec()]);
    if let Some(names) = &o.namespaces {
        spec.namespaces = nsfast::ns::flags(names.split(',').filter(|n| !n.is_empty())).expect("namespace names");
    }
    if !o.userns {
        spec.namespaces &= !(libc::CLONE_NEWUSER as u64);
    }
    if !o.seccomp {
        spec.seccomp = None;
    }
    // As Spec.init=None in Python: nsfast-init exactly when there is a pid namespace.
    spec.init = o.init.unwrap_or(spec.namespaces & libc::CLONE_NEWPID as u64 != 0);
    if !o.masks {
        spec.masked_paths.clear();
        spec.readonly_paths.clear();
        spec.hidden.clear();
    }
    let limits = if o.limits { default_limits() } else { Limits::default() };
    let use_cgroup = o.cgroup && rustix::process::geteuid().is_root();
    let backend = use_cgroup.then(|| {
        let hierarchy = cgroup::detect().expect("a cgroup filesystem");
        // Mount-relative (<mount>/nsfast), not below our own cgroup: a bench must not make
        // cgroups inside one the machine owns.
        cgroup::backend_at(&hierarchy, &cgroup::Root::Path("nsfast".into())).expect("cgroup backend")
    });
    let kill_tree = spec.namespaces & libc::CLONE_NEWPID as u64 == 0;
    let caller = nsfast::Caller::current();
    let mut clone_flags = 0;
    let mut samples = Vec::with_capacity(o.n);
    for i in 0..o.warmup + o.n {
        let t = Instant::now();
        let plan = nsfast::Plan::build(&spec, caller).expect("plan");
        clone_flags = plan.clone_flags;
        let mut cg = backend.as_ref().map(|b| b.create(&cgroup::unique_name(), &limits, kill_tree).expect("cgroup"));
        let io = nsfast::Io { stdio: [-1; 3], pass_fds: &[], cgroup: cg.as_deref(), trees: &[] };
        let child = nsfast::spawn(&plan, &io).expect("spawn");
        let (status, _) = nsfast::wait(child.pid, child.pidfd.as_raw_fd(), None).expect("wait").expect("no timeout");
        let status = nsfast::spawn::command_status(status, child.status.as_ref().map(|f| f.as_fd()));
        assert_eq!(status, 0, "/bin/true failed");
        if let Some(cg) = cg.as_mut() {
            if kill_tree {
                cg.kill().expect("kill");
            }
            let _ = cg.usage();
            cg.remove().expect("remove");
        }
        if i >= o.warmup {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let taken: Vec<String> = samples.iter().map(|s| format!("{s:.1}")).collect();
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    let namespaces: Vec<&str> =
        nsfast::ns::NAMESPACES.iter().filter(|(_, flag)| clone_flags & flag != 0).map(|(name, _)| *name).collect();
    let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
    let mut json = format!(
        "{{\"n\": {}, \"cgroup\": {use_cgroup}, \"namespaces\": \"{}\", \"seccomp\": {}, \"masks\": {}, \
         \"limits\": {{\"memory\": {}, \"pids\": {}}}, \"median_us\": {:.1}, \"p90_us\": {:.1}",
        o.n,
        namespaces.join(","),
        spec.seccomp.is_some(),
        !(spec.masked_paths.is_empty() && spec.readonly_paths.is_empty() && spec.hidden.is_empty()),
        opt(use_cgroup.then_some(limits.memory).flatten()),
        opt(use_cgroup.then_some(limits.pids).flatten()),
        q(0.5),
        q(0.9),
    );
    json += &format!(", \"init\": {}", spec.init);
    if o.samples {
        json += &format!(", \"samples_us\": [{}]", taken.join(", "));
    }
    println!("{json}}}");
}
