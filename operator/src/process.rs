//! The process's own limits.

/// Raises this process's soft limit on open files to its hard limit (as Go programs do
/// at start): every device connection the gateway holds is a descriptor, and the usual
/// soft limit of 1024 would cap a replica at about a thousand devices however high an
/// administrator set the hard limit (`LimitNOFILE`, the container runtime's `nofile`).
/// Returns the soft limit before and after; an unlimited hard limit leaves the soft one
/// as it is.
pub fn raise_open_files_limit() -> std::io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if let Some(max) = limit.maximum
        && limit.current.is_none_or(|c| c < max)
    {
        setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        )?;
    }
    Ok((before, getrlimit(Resource::Nofile).current))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_soft_limit_on_open_files_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        let Some(hard) = hard.filter(|h| *h > 64) else {
            return; // nothing to raise towards
        };
        // As a service manager would start it: a low soft limit.
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(64),
                maximum: Some(hard),
            },
        )
        .unwrap();
        let (before, after) = raise_open_files_limit().unwrap();
        assert_eq!(before, Some(64));
        assert_eq!(after, Some(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
    }
}
