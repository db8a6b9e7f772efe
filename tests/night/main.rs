//! Integration tests for verify, convergence, cutover and reliability: real
//! `nightpass` processes, loopback QUIC, loop devices, ext4 and fsfreeze.
//! Tests that need root or a kernel feature skip loudly when it is missing.

mod access;
mod configs;
mod cutover;
mod harness;
mod hostile;
mod journal;
mod relay;
mod reliability;
mod safety;
mod seal;
mod sync;
mod trust;
mod verify;
