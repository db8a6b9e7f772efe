//! The passes' one import path into the network: re-exports what they use
//! from [`identity`](super::identity), [`endpoint`](super::endpoint),
//! [`framing`](super::framing), [`tuning`](super::tuning) and
//! [`refusals`](super::refusals).
//!
//! Owns nothing of its own.

pub use super::endpoint::{
    close_clients, close_session, connect, explain, server_config, server_endpoint, RemoteVolume,
};
pub use super::framing::{
    read_data_frame, read_frame, recv_control, send_control, with_heartbeats, write_bufs,
    DataFrame, FRAME_DEADLINE,
};
pub use super::identity::{
    default_identity_dir, fingerprint_of, parse_fingerprint, peer_fingerprint, Identity,
    SERVER_NAME,
};
pub use super::refusals::{flush_refusals, log_refusal};
pub use super::tuning::{
    grow_udp_buffers, Tuning, CONNECT_TIMEOUT, CONN_WINDOW, MAX_STREAM_WINDOW, UDP_BUFFER,
};
