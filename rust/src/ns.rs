//! Namespace types, named as in `/proc/self/ns`.

use std::collections::BTreeMap;
use std::io;

/// (name in /proc/PID/ns, CLONE_NEW* flag), in the order used for setns and reports.
pub const NAMESPACES: [(&str, u64); 8] = [
    ("user", libc::CLONE_NEWUSER as u64),
    ("mnt", libc::CLONE_NEWNS as u64),
    ("pid", libc::CLONE_NEWPID as u64),
    ("uts", libc::CLONE_NEWUTS as u64),
    ("ipc", libc::CLONE_NEWIPC as u64),
    ("net", libc::CLONE_NEWNET as u64),
    ("cgroup", libc::CLONE_NEWCGROUP as u64),
    ("time", libc::CLONE_NEWTIME as u64),
];

/// The CLONE_NEW* flag of a namespace name, or None for an unknown name.
pub fn flag(name: &str) -> Option<u64> {
    NAMESPACES.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// OR of the flags of `names`; the first unknown name is the error.
pub fn flags<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<u64, String> {
    names.into_iter().try_fold(0u64, |acc, n| flag(n).map(|f| acc | f).ok_or_else(|| n.to_owned()))
}

/// Namespace type -> inode for `pid` ("self" or a number), read from /proc/PID/ns.
/// Types the kernel does not have are left out.
pub fn inodes(pid: &str) -> io::Result<BTreeMap<String, u64>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    for (name, _) in NAMESPACES {
        match std::fs::metadata(format!("/proc/{pid}/ns/{name}")) {
            Ok(m) => {
                out.insert(name.to_owned(), m.ino());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && std::path::Path::new(&format!("/proc/{pid}")).exists() => {
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_distinct_flags() {
        let all = flags(NAMESPACES.iter().map(|(n, _)| *n)).unwrap();
        assert_eq!(all.count_ones(), 8);
        assert_eq!(flag("net"), Some(libc::CLONE_NEWNET as u64));
        assert_eq!(flags(["pid", "bogus"]), Err("bogus".to_owned()));
    }

    #[test]
    fn self_inodes_cover_the_common_types() {
        let map = inodes("self").unwrap();
        for name in ["mnt", "pid", "net", "uts", "ipc", "user"] {
            assert!(map[name] > 0, "{name}");
        }
    }
}
