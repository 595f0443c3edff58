//! The device owner's consent to plugin grants. An EdgeModel's author (a namespace
//! user) asks for grants; the device owner allows them in `agent.toml`'s `[plugins]`
//! section ([`crate::config::PluginsSection`]); a hard deny list of the agent's own
//! secrets and the kernel's interfaces applies on top of any allowlist, even `/`.
//! [`GrantPolicy::check`] refuses a plugin whose grants exceed the allowlist or touch
//! the deny list ([`GrantDenied`], reported as `PluginGrantDenied`); it never narrows a
//! grant.
//!
//! Directories are compared component-wise, and a grant is refused when it contains a
//! denied path or lies inside one. A requested directory is first checked as written
//! (absolute, no `..`, not overlapping the deny list, inside an allowed directory); only
//! then, when the owner has allowed it, is it resolved on disk (symlinks followed), and
//! the resolved path must still be inside an allowed directory and clear of the deny
//! list (whose entries are compared both as written and resolved). The plugin is then
//! given the resolved path.

use std::path::{Component, Path, PathBuf};

use crate::config::{AgentConfig, PluginsSection};
use crate::plugins::Grants;

/// Paths no plugin may be granted, on any device, whatever its allowlist says: the
/// agent's default configuration and state directories and the kernel's interfaces.
/// The configured state and config directories and the token file are added per device.
pub const ALWAYS_DENIED: &[&str] = &[
    "/etc/edgefleet",
    "/var/lib/edgefleet",
    "/run/credentials",
    "/proc",
    "/sys",
    "/dev",
];

/// A plugin's grant the device does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{plugin}: {grant}: {why}")]
pub struct GrantDenied {
    /// The plugin.
    pub plugin: String,
    /// Which grant (`network`, `clocks`, `env SHOP_ID`, `readOnlyDirs /etc`).
    pub grant: String,
    /// Why it is refused.
    pub why: String,
}

/// What plugins on this device may be granted: the owner's allowlist and the deny list.
#[derive(Debug, Clone, Default)]
pub struct GrantPolicy {
    allow: PluginsSection,
    deny: Vec<PathBuf>,
}

impl GrantPolicy {
    /// The policy of a fleet device: its `[plugins]` allowlist, and the deny list
    /// ([`ALWAYS_DENIED`], its state and config directories, the token file, its trust
    /// pin directory and the systemd credentials directory).
    pub fn for_device(config: &AgentConfig) -> Self {
        let mut extra = vec![config.state_dir.clone(), config.config_dir.clone()];
        extra.extend(config.gateway.bootstrap_token_file.clone());
        extra.push(config.trust.dir(&config.config_dir));
        extra.extend(std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from));
        Self::new(config.plugins.clone(), extra)
    }

    /// A policy with allowlist `allow`, denying [`ALWAYS_DENIED`] and `extra_deny`.
    pub fn new(allow: PluginsSection, extra_deny: impl IntoIterator<Item = PathBuf>) -> Self {
        let mut deny: Vec<PathBuf> = ALWAYS_DENIED.iter().map(PathBuf::from).collect();
        for p in extra_deny {
            if p.as_os_str().is_empty() {
                continue;
            }
            deny.push(absolute(&p));
        }
        // Compare both the path as written and where it leads now.
        let resolved: Vec<PathBuf> = deny
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        deny.extend(resolved);
        deny.sort();
        deny.dedup();
        Self { allow, deny }
    }

    /// The paths no grant may touch.
    pub fn denied(&self) -> &[PathBuf] {
        &self.deny
    }

    /// Checks `grants` of `plugin` against the policy. Returns the grants to run it with:
    /// the same, with each directory's host path resolved (so that a symlink cannot be
    /// swapped in between). Any grant the device does not allow refuses the plugin.
    pub fn check(&self, plugin: &str, grants: &Grants) -> Result<Grants, GrantDenied> {
        let denied = |grant: String, why: &str| GrantDenied {
            plugin: plugin.to_owned(),
            grant,
            why: why.to_owned(),
        };
        if grants.network && !self.allow.allow_network {
            return Err(denied(
                "network".into(),
                "the device does not allow it (plugins.allow_network)",
            ));
        }
        if grants.clocks && !self.allow.allow_clocks {
            return Err(denied(
                "clocks".into(),
                "the device does not allow it (plugins.allow_clocks)",
            ));
        }
        if let Some(name) = grants
            .env
            .keys()
            .find(|k| !self.allow.allow_env.contains(k))
        {
            return Err(denied(
                format!("env {name}"),
                "the device does not allow it (plugins.allow_env)",
            ));
        }
        let mut out = grants.clone();
        for (host, _guest) in &mut out.read_only_dirs {
            *host = self
                .check_dir(host)
                .map_err(|why| denied(format!("readOnlyDirs {}", host.display()), &why))?;
        }
        Ok(out)
    }

    /// Checks one requested directory; returns it resolved.
    fn check_dir(&self, dir: &Path) -> Result<PathBuf, String> {
        let plain = dir
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !dir.is_absolute() || !plain {
            return Err("not an absolute path without `..`".into());
        }
        // As written, before anything on disk is looked at.
        self.clear_of_deny_list(dir)?;
        let allowed_written = self.allow.allow_read_dirs.iter().any(|a| {
            dir.starts_with(a) || std::fs::canonicalize(a).is_ok_and(|a| dir.starts_with(a))
        });
        if !allowed_written {
            return Err("not in the device's allowlist (plugins.allow_read_dirs)".into());
        }
        // The owner allowed this path: now resolve it.
        let resolved =
            std::fs::canonicalize(dir).map_err(|e| format!("cannot be resolved: {e}"))?;
        let allowed_resolved = self
            .allow
            .allow_read_dirs
            .iter()
            .any(|a| std::fs::canonicalize(a).is_ok_and(|a| resolved.starts_with(a)));
        if !allowed_resolved {
            return Err(format!(
                "resolves to {}, outside the device's allowlist (plugins.allow_read_dirs)",
                resolved.display()
            ));
        }
        self.clear_of_deny_list(&resolved).map_err(|why| {
            if resolved == dir {
                why
            } else {
                format!("resolves to {}, which {why}", resolved.display())
            }
        })?;
        Ok(resolved)
    }

    /// Refuses `dir` when it is a denied path, contains one, or lies inside one.
    fn clear_of_deny_list(&self, dir: &Path) -> Result<(), String> {
        match self
            .deny
            .iter()
            .find(|d| dir.starts_with(d) || d.starts_with(dir))
        {
            Some(d) => Err(format!(
                "overlaps {}, on the agent's deny list",
                d.display()
            )),
            None => Ok(()),
        }
    }
}

/// `p` made absolute against the working directory (the configuration may name a
/// relative state directory).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(dirs: &[&str]) -> Grants {
        Grants {
            read_only_dirs: dirs
                .iter()
                .map(|d| (PathBuf::from(d), d.to_string()))
                .collect(),
            ..Grants::default()
        }
    }

    #[test]
    fn an_empty_allowlist_allows_nothing_but_no_grants() {
        let p = GrantPolicy::new(PluginsSection::default(), []);
        assert_eq!(p.check("x", &Grants::default()), Ok(Grants::default()));
        let net = Grants {
            network: true,
            ..Grants::default()
        };
        assert_eq!(p.check("x", &net).unwrap_err().grant, "network");
        let clocks = Grants {
            clocks: true,
            ..Grants::default()
        };
        assert_eq!(p.check("x", &clocks).unwrap_err().grant, "clocks");
        let env = Grants {
            env: [("SHOP_ID".to_owned(), "1".to_owned())].into(),
            ..Grants::default()
        };
        let e = p.check("x", &env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x: env SHOP_ID: the device does not allow it (plugins.allow_env)"
        );
        let tmp = std::env::temp_dir();
        let e = p.check("x", &dirs(&[tmp.to_str().unwrap()])).unwrap_err();
        assert!(e.why.contains("allowlist"), "{e}");
    }

    #[test]
    fn relative_and_dotdot_paths_are_refused() {
        let allow = PluginsSection {
            allow_read_dirs: vec!["/".into()],
            ..PluginsSection::default()
        };
        let p = GrantPolicy::new(allow, []);
        for bad in ["srv/data", "/srv/../etc/edgefleet", "/srv/data/.."] {
            let e = p.check("x", &dirs(&[bad])).unwrap_err();
            assert!(e.why.contains("absolute path"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_allowed_dir_is_refused_not_dropped() {
        let d = tempfile::tempdir().unwrap();
        let allow = PluginsSection {
            allow_read_dirs: vec![d.path().to_owned()],
            ..PluginsSection::default()
        };
        let p = GrantPolicy::new(allow, []);
        let gone = d.path().join("gone");
        let e = p.check("x", &dirs(&[gone.to_str().unwrap()])).unwrap_err();
        assert!(e.why.contains("cannot be resolved"), "{e}");
    }
}
