//! Enrolment tokens (EdgeBootstrapToken) and device-owned labels: filled in by the
//! token work.
