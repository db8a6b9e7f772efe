//! The network: QUIC endpoints, identities and fingerprint pinning, QUIC
//! tuning, framing on streams.
//!
//! Owns every use of `quinn` and `rustls`. It must not know what a pass is:
//! it moves frames between two pinned peers and keeps sessions alive.
//!
//! - [`identity`]: identity files and fingerprints.
//! - `pinning` (private): the TLS verifiers that pin fingerprints.
//! - [`endpoint`]: endpoints, connections, closing them, remote addresses.
//! - [`framing`]: frames and control messages on streams, heartbeats.
//! - [`tuning`]: QUIC windows, congestion control, UDP buffers.
//! - [`refusals`]: the rate-limited log of refused connections.
//! - [`transport`]: the passes' one import path to all of the above.

pub mod endpoint;
pub mod framing;
pub mod identity;
mod pinning;
pub mod refusals;
pub mod transport;
pub mod tuning;
