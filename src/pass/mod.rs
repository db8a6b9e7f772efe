//! One pass, from both ends: the sender's driver and the receiver's serve
//! loop, sessions and durable writer.
//!
//! Owns the drivers that move a pass's bytes: reading chunks through
//! [`crate::io`], sending and receiving them through [`crate::net`], and
//! recording what is durable through [`crate::store`]. The protocol's
//! decisions (formats, the patch arithmetic, the ledger of chunks in
//! flight, chunk sets) belong to the `nightpass-proto` crate. It must not
//! decide policies that belong to a command (when to freeze, how many
//! passes to run: [`crate::app`]).

pub mod receiver;
pub mod sender;
