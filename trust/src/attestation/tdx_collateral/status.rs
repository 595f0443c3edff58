//! Intel's TCB statuses ([`TcbStatus`]): their names in the collateral, and how the
//! statuses of the platform, the TDX module and the QE converge into one.

use crate::attestation::AttestationError;

/// A TCB status as Intel names it, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcbStatus {
    /// Fully patched.
    UpToDate,
    /// Patched; software mitigations are needed.
    SwHardeningNeeded,
    /// Patched; the platform's configuration needs a change.
    ConfigurationNeeded,
    /// Both of the above.
    ConfigurationAndSwHardeningNeeded,
    /// Not patched for the listed advisories.
    OutOfDate,
    /// Not patched, and the configuration needs a change.
    OutOfDateConfigurationNeeded,
    /// The platform's keys are revoked.
    Revoked,
}

impl TcbStatus {
    pub(super) fn parse(s: &str) -> Result<Self, AttestationError> {
        Ok(match s {
            "UpToDate" => Self::UpToDate,
            "SWHardeningNeeded" => Self::SwHardeningNeeded,
            "ConfigurationNeeded" => Self::ConfigurationNeeded,
            "ConfigurationAndSWHardeningNeeded" => Self::ConfigurationAndSwHardeningNeeded,
            "OutOfDate" => Self::OutOfDate,
            "OutOfDateConfigurationNeeded" => Self::OutOfDateConfigurationNeeded,
            "Revoked" => Self::Revoked,
            other => {
                return Err(AttestationError::CollateralInvalid(format!(
                    "unknown tcbStatus {other:?}"
                )));
            }
        })
    }

    /// Intel's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpToDate => "UpToDate",
            Self::SwHardeningNeeded => "SWHardeningNeeded",
            Self::ConfigurationNeeded => "ConfigurationNeeded",
            Self::ConfigurationAndSwHardeningNeeded => "ConfigurationAndSWHardeningNeeded",
            Self::OutOfDate => "OutOfDate",
            Self::OutOfDateConfigurationNeeded => "OutOfDateConfigurationNeeded",
            Self::Revoked => "Revoked",
        }
    }

    /// Converges several statuses into one that keeps every need any of them names.
    pub fn converge(all: &[TcbStatus]) -> TcbStatus {
        let any = |f: fn(TcbStatus) -> bool| all.iter().any(|&s| f(s));
        let revoked = any(|s| s == Self::Revoked);
        let out_of_date =
            any(|s| matches!(s, Self::OutOfDate | Self::OutOfDateConfigurationNeeded));
        let config = any(|s| {
            matches!(
                s,
                Self::ConfigurationNeeded
                    | Self::ConfigurationAndSwHardeningNeeded
                    | Self::OutOfDateConfigurationNeeded
            )
        });
        let sw = any(|s| {
            matches!(
                s,
                Self::SwHardeningNeeded | Self::ConfigurationAndSwHardeningNeeded
            )
        });
        match (revoked, out_of_date, config, sw) {
            (true, ..) => Self::Revoked,
            (false, true, true, _) => Self::OutOfDateConfigurationNeeded,
            (false, true, false, _) => Self::OutOfDate,
            (false, false, true, true) => Self::ConfigurationAndSwHardeningNeeded,
            (false, false, true, false) => Self::ConfigurationNeeded,
            (false, false, false, true) => Self::SwHardeningNeeded,
            (false, false, false, false) => Self::UpToDate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_converge_keeping_every_need() {
        use TcbStatus::*;
        assert_eq!(TcbStatus::converge(&[UpToDate, UpToDate]), UpToDate);
        assert_eq!(
            TcbStatus::converge(&[ConfigurationNeeded, OutOfDate]),
            OutOfDateConfigurationNeeded
        );
        assert_eq!(
            TcbStatus::converge(&[SwHardeningNeeded, ConfigurationNeeded]),
            ConfigurationAndSwHardeningNeeded
        );
        assert_eq!(TcbStatus::converge(&[UpToDate, Revoked]), Revoked);
        assert_eq!(
            TcbStatus::converge(&[SwHardeningNeeded, UpToDate]),
            SwHardeningNeeded
        );
    }
}
