//! The agent's local trust pins (`/etc/edgefleet/trust`, first-use pinning).
