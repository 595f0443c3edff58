//! The bootstrap token on the device. It is read from a file only its owner can read:
//! `gateway.bootstrap_token_file`, or systemd's `$CREDENTIALS_DIRECTORY/bootstrap-token`
//! (a group- or world-readable file is refused, `TokenFileTooOpen`; an inline token and
//! an existing file together are `TokenConflict`; with the file missing, an inline
//! token is used, so that an upgraded device still starts). The token serves only the device's first
//! enrolment: a configured file that is missing means no token, and with
//! `gateway.delete_token_after_enrol` the agent deletes that file once it is enrolled
//! (never the systemd credential's copy, which systemd owns).

use std::path::{Path, PathBuf};

use super::{ConfigError, GatewayConfig, Secret};

/// The systemd credential name the bootstrap token is read as, for a unit that adds
/// `LoadCredential=bootstrap-token:<file>` (the packaged unit does not: it names a file).
pub const TOKEN_CREDENTIAL: &str = "bootstrap-token";

/// Reads a bootstrap token file, refusing one that group or others may read
/// ([`ConfigError::TokenFileTooOpen`]). Surrounding whitespace is trimmed.
pub fn read_token_file(path: &Path) -> Result<Secret, ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mode = file.metadata().map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::TokenFileTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::io::read_to_string(file).map_err(read)?;
    Ok(Secret::new(text.trim().to_owned()))
}

/// Reads the bootstrap token from `bootstrap_token_file` (none when the file does not
/// exist: the device may be enrolled already), else from the systemd credential in
/// `credentials` when it exists, else keeps the inline value.
pub(super) fn resolve_token(
    g: &mut GatewayConfig,
    credentials: Option<&Path>,
) -> Result<(), ConfigError> {
    let credential = credentials
        .map(|d| d.join(TOKEN_CREDENTIAL))
        .filter(|p| p.exists());
    let (file, is_credential) = match (g.bootstrap_token_file.clone(), credential) {
        (Some(f), _) => (f, false),
        (None, Some(c)) => (c, true),
        (None, None) => return Ok(()),
    };
    // A missing token file is no token. An inline token (say, the environment an
    // earlier package told owners to set) is then kept, not refused: the agent must
    // still start after an upgrade that added the file setting.
    if !is_credential && !file.exists() {
        return Ok(());
    }
    if !g.bootstrap_token.expose().is_empty() {
        return Err(ConfigError::TokenConflict);
    }
    g.bootstrap_token = read_token_file(&file)?;
    g.bootstrap_token_file = Some(file);
    g.token_is_credential = is_credential;
    Ok(())
}

/// After an enrolment the gateway answered: deletes the configured token file when
/// `gateway.delete_token_after_enrol` is set and the file exists (never the systemd
/// credential's copy). Returns the file deleted; a failure to delete is logged.
pub fn delete_token_after_enrol(g: &GatewayConfig) -> Option<PathBuf> {
    if !g.delete_token_after_enrol || g.token_is_credential {
        return None;
    }
    let file = g.bootstrap_token_file.as_ref()?;
    match std::fs::remove_file(file) {
        Ok(()) => {
            tracing::info!(
                file = %file.display(),
                "enrolled: deleted the bootstrap token file (the token serves only the first enrolment)"
            );
            Some(file.clone())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "deleting the bootstrap token file after enrolment");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::load;
    use super::super::tests::{BASE, dir};
    use super::*;

    const NO_TOKEN: &str = "[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\n";

    fn token_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, "file-token-0123456789\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn the_token_file_must_be_private_to_its_owner() {
        let secrets = tempfile::tempdir().unwrap();
        let open = token_file(secrets.path(), "open", 0o644);
        let d = dir(&[(
            "agent.toml",
            &format!("{NO_TOKEN}bootstrap_token_file = \"{}\"\n", open.display()),
        )]);
        let err = load(d.path(), []).unwrap_err();
        assert!(
            matches!(err, ConfigError::TokenFileTooOpen { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("TokenFileTooOpen: "), "{err}");
        for mode in [0o640, 0o604] {
            let p = token_file(secrets.path(), &format!("m{mode:o}"), mode);
            assert!(matches!(
                read_token_file(&p),
                Err(ConfigError::TokenFileTooOpen { .. })
            ));
        }

        let private = token_file(secrets.path(), "private", 0o600);
        let d = dir(&[(
            "agent.toml",
            &format!(
                "{NO_TOKEN}bootstrap_token_file = \"{}\"\n",
                private.display()
            ),
        )]);
        let c = load(d.path(), []).unwrap();
        assert_eq!(c.gateway.bootstrap_token.expose(), "file-token-0123456789");
        assert!(
            !format!("{c:?}").contains("file-token"),
            "Debug must not show it"
        );

        // A token inline and a token file: which one is meant is not guessed.
        let d = dir(&[(
            "agent.toml",
            &format!("{BASE}bootstrap_token_file = \"{}\"\n", private.display()),
        )]);
        assert!(matches!(
            load(d.path(), []).unwrap_err(),
            ConfigError::TokenConflict
        ));
        // The same with the file missing (a device upgraded from a package that had the
        // token in the environment): the inline token is used, the agent starts.
        let missing = secrets.path().join("missing");
        let d = dir(&[(
            "agent.toml",
            &format!("{BASE}bootstrap_token_file = \"{}\"\n", missing.display()),
        )]);
        let c = load(d.path(), []).unwrap();
        assert!(!c.gateway.bootstrap_token.expose().is_empty());
        assert_eq!(
            c.gateway.bootstrap_token_file.as_deref(),
            Some(missing.as_path())
        );
    }

    #[test]
    fn the_token_is_read_from_the_systemd_credential() {
        let creds = tempfile::tempdir().unwrap();
        let d = dir(&[("agent.toml", NO_TOKEN)]);
        let env = || {
            [(
                "CREDENTIALS_DIRECTORY".to_owned(),
                creds.path().display().to_string(),
            )]
        };
        // No credential of that name: no token, and no error.
        let c = load(d.path(), env()).unwrap();
        assert_eq!(c.gateway.bootstrap_token.expose(), "");
        assert_eq!(c.gateway.bootstrap_token_file, None);
        // systemd writes credentials 0400.
        let p = token_file(creds.path(), TOKEN_CREDENTIAL, 0o400);
        let c = load(d.path(), env()).unwrap();
        assert_eq!(c.gateway.bootstrap_token.expose(), "file-token-0123456789");
        assert_eq!(c.gateway.bootstrap_token_file, Some(p));
        assert_eq!(c.config_dir, d.path());
    }

    #[test]
    fn a_missing_token_file_is_no_token_and_is_deleted_only_when_asked() {
        let secrets = tempfile::tempdir().unwrap();
        let gone = secrets.path().join("gone");
        let d = dir(&[(
            "agent.toml",
            &format!("{NO_TOKEN}bootstrap_token_file = \"{}\"\n", gone.display()),
        )]);
        let c = load(d.path(), []).unwrap();
        assert_eq!(c.gateway.bootstrap_token.expose(), "");
        assert!(!c.gateway.delete_token_after_enrol);

        let file = token_file(secrets.path(), "token", 0o600);
        let text = format!("{NO_TOKEN}bootstrap_token_file = \"{}\"\n", file.display());
        let c = load(dir(&[("agent.toml", &text)]).path(), []).unwrap();
        assert_eq!(delete_token_after_enrol(&c.gateway), None);
        assert!(file.exists(), "not asked to delete it");
        let text = format!("{text}delete_token_after_enrol = true\n");
        let c = load(dir(&[("agent.toml", &text)]).path(), []).unwrap();
        assert_eq!(delete_token_after_enrol(&c.gateway), Some(file.clone()));
        assert!(!file.exists());
        // Gone: the device is enrolled; loading again is no token, not an error.
        let c = load(dir(&[("agent.toml", &text)]).path(), []).unwrap();
        assert_eq!(c.gateway.bootstrap_token.expose(), "");
        assert_eq!(delete_token_after_enrol(&c.gateway), None);
    }

    #[test]
    fn the_systemd_credential_is_never_deleted() {
        let creds = tempfile::tempdir().unwrap();
        let p = token_file(creds.path(), TOKEN_CREDENTIAL, 0o400);
        let d = dir(&[(
            "agent.toml",
            &format!("{NO_TOKEN}delete_token_after_enrol = true\n"),
        )]);
        let env = [(
            "CREDENTIALS_DIRECTORY".to_owned(),
            creds.path().display().to_string(),
        )];
        let c = load(d.path(), env).unwrap();
        assert!(c.gateway.token_is_credential);
        assert_eq!(delete_token_after_enrol(&c.gateway), None);
        assert!(p.exists());
    }
}
