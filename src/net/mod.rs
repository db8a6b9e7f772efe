//! The network: QUIC endpoints, identities and fingerprint pinning, QUIC
//! tuning, framing on streams.
//!
//! Owns every use of `quinn` and `rustls`. It must not know what a pass is:
//! it moves frames between two pinned peers and keeps sessions alive.

pub mod transport;
