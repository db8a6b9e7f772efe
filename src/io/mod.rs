//! Everything that touches a device or the kernel on the data's behalf.
//!
//! Owns opening and reading sources, opening and writing targets
//! ([`device`]), the read-and-hash pipeline ([`hash`]), fsfreeze, LVM
//! snapshots and operator hooks ([`freeze`]), the kernel's record of block
//! writes through a private tracefs instance ([`track`]), an LVM thin
//! volume's change set between two thin snapshots and its identity
//! ([`thin`]), and every `unsafe` of the crate ([`sys`]). It must not know the protocol, the network or the state
//! directory's layout.

pub mod device;
pub mod freeze;
pub mod hash;
pub mod pool;
#[allow(unsafe_code)]
pub mod sys;
pub mod thin;
pub mod track;
