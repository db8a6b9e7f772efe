//! Integration tests, one binary with topic modules: real `nightpass`
//! processes as sender and receiver, QUIC on 127.0.0.1 (ephemeral ports),
//! image files, and as root loop devices, ext4 and fsfreeze. Every test owns
//! its temp directories, identities and receiver, so tests run in parallel
//! threads without sharing anything. Tests that need root or a kernel
//! feature skip loudly when it is missing, and fail under `CI=true`.
//!
//! One harness ([`harness`], in parts by topic) serves every module.

mod access;
mod configs;
mod cutover;
mod devices;
mod dryrun;
mod fleet;
mod fleet_agent;
mod fleet_night;
mod group;
mod harness;
mod hostile;
mod journal;
mod metrics;
mod ops;
mod outputs;
mod passes;
mod plan;
mod refusals;
mod relay;
mod reliability;
mod safety;
mod seal;
mod sync;
mod thin;
mod tracefs;
mod tracking;
mod trust;
mod verify;
