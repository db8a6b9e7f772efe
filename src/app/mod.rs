//! Commands and their policies: the flags and what each subcommand does
//! with them.
//!
//! Owns the command line ([`cli`]), one function per subcommand
//! ([`commands`]), convergence and the frozen cutover ([`cutover`]),
//! verify-only mode ([`verify`]), the demonstration ([`demo`]) and
//! `nightpass bench` ([`benchmark`]), the log's line format ([`log`]), completions and
//! manual pages ([`manual`]). It decides *what* runs and in which
//! order; it must not speak the protocol itself (that is [`crate::pass`]
//! over [`crate::net`]), make system calls on volume data (that is
//! [`crate::io`]) or lay out the state directory (that is [`crate::store`]).

pub mod benchmark;
pub mod cli;
pub mod commands;
pub mod cutover;
pub mod demo;
pub mod log;
pub mod manual;
pub mod plan;
pub mod track;
pub mod verify;
