//! Integration tests: the real `nightpass` binary as sender and receiver
//! processes, talking QUIC on 127.0.0.1 (ephemeral ports), on image files and,
//! as root, on loop devices.
//!
//! Every test owns its temp directories, identities and receiver, so the
//! tests of this one binary run in parallel threads without sharing anything.

mod common;
mod devices;
mod refusals;
mod sync;
