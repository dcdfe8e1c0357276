//! Errors of the core. Each names the step that failed; the errno is kept as the source.

use rustix::io::Errno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec value that cannot work, found before any system call.
    #[error("{field}: {msg}")]
    Invalid { field: &'static str, msg: String },
    /// A step of starting the sandbox failed, in the parent or in the child.
    #[error("{step}: {errno}{}", .filename.as_ref().map(|f| format!(": {f}")).unwrap_or_default())]
    Spawn { step: String, filename: Option<String>, errno: Errno },
    /// A limit the kernel refused (its cgroup file would not take the value).
    #[error("{limit}: {msg}")]
    Limit { limit: String, msg: String },
}

impl Error {
    pub fn invalid(field: &'static str, msg: impl Into<String>) -> Error {
        Error::Invalid { field, msg: msg.into() }
    }

    pub fn spawn(step: impl Into<String>, filename: Option<String>, errno: Errno) -> Error {
        Error::Spawn { step: step.into(), filename, errno }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_step_and_file() {
        let e = Error::spawn("exec", Some("nope".into()), Errno::NOENT);
        assert_eq!(e.to_string(), format!("exec: {}: nope", Errno::NOENT));
        assert_eq!(Error::invalid("hostname", "is too long").to_string(), "hostname: is too long");
    }
}
