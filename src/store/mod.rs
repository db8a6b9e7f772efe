//! The state, whole: volume keys, manifests, journals, locks, seals.
//!
//! Owns every file under a state directory ([`state`]), the journals'
//! typed records ([`journal`]), sealed volumes ([`seal`]) and the
//! [`Store`] trait through which the records that matter across hosts are
//! kept. It must not speak the protocol or decide a pass's policy; it keeps
//! records and answers what they say.
//!
//! ## What goes through [`Store`], and what stays local
//! A fleet of agents (issue 17) will share its records in one database, so
//! the records another host may need to see go through the [`Store`]
//! trait, per volume: on a sender, keyed by the receiver's fingerprint and
//! the volume's name there ([`SenderVolume`]), the journal (passes, target
//! reads, cutovers, unseals seen) and the source record; on a receiver,
//! keyed by the volume's name, the journal (cutovers recorded, unseals) and
//! the seal. [`FileStore`] keeps them in the state directory as files, the
//! layout earlier releases wrote; a PostgreSQL store would keep them as
//! rows (one table per kind of record, the key as columns, an append in a
//! transaction) and implement the same trait.
//!
//! Manifests stay local, memory-mapped files in the state directory
//! ([`state::ManifestFile`]), whatever the store: a manifest is one 32-byte
//! entry per chunk (512 MiB per TiB), read and written entry by entry at
//! the speed of the pass and made durable with `msync` in a fixed order
//! against the data (see `nightpass_proto::manifest`); it describes the
//! device on this host, is locked (`flock`) by the process that holds the
//! volume, and is rebuilt from the other end or from the device when lost.
//! A database round trip per chunk would cost the pass its speed and buy
//! nothing: no other host can use it. The receiver's target record and its
//! rebuild mark belong to that manifest and stay beside it.
//!
//! Today every caller opens the file store of its state directory (the
//! sender in `pass::sender`, the receiver once per `serve`); when a second
//! store exists, the choice is made once in `app/` and handed down.

use std::fmt::Debug;
use std::sync::Arc;

use crate::error::Result;

pub mod file;
pub mod journal;
pub mod seal;
pub mod state;
pub mod tracking;

pub use file::FileStore;

use journal::{ReceiverRecord, SenderRecord};
use seal::Seal;
use state::SourceRecord;

/// A volume as a sender knows it: who the receiver is (its pinned
/// fingerprint) and what the volume is called there. How the receiver's
/// address was typed does not matter: `newfiler:7400/filer01` and
/// `10.99.0.2:7400/filer01` are one volume with one history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SenderVolume {
    /// The receiver's certificate fingerprint.
    pub receiver: String,
    /// The volume's name on the receiver.
    pub name: String,
}

/// Where the records that matter across hosts are kept: the journals, a
/// sender's source records and a receiver's seals (see the module docs for
/// what stays local and why).
///
/// Every read surfaces its errors: a journal that exists but cannot be
/// read is an error, never an empty history (which would start the volume
/// over as its first pass), and a record of a format newer than this
/// release reads ([`journal::FORMAT`]) is refused, not misread. Every
/// write is durable when it returns.
pub trait Store: Debug + Send + Sync {
    /// Appends `record` to the sender's journal of `volume`.
    fn append_sender_record(&self, volume: &SenderVolume, record: &SenderRecord) -> Result<()>;

    /// The sender's journal of `volume`, oldest first; empty when it has none.
    fn sender_records(&self, volume: &SenderVolume) -> Result<Vec<SenderRecord>>;

    /// The source the sender's passes of `volume` read, if recorded.
    fn source(&self, volume: &SenderVolume) -> Result<Option<SourceRecord>>;

    /// Records (replacing) the source the sender's passes of `volume` read.
    fn set_source(&self, volume: &SenderVolume, source: &SourceRecord) -> Result<()>;

    /// Appends `record` to the receiver's journal of exported volume `name`.
    fn append_receiver_record(&self, name: &str, record: &ReceiverRecord) -> Result<()>;

    /// The receiver's journal of exported volume `name`, oldest first.
    fn receiver_records(&self, name: &str) -> Result<Vec<ReceiverRecord>>;

    /// The seal of exported volume `name`, `None` when it is not sealed. A
    /// seal that exists but cannot be read is an error, which the caller
    /// counts as sealed.
    fn seal(&self, name: &str) -> Result<Option<Seal>>;

    /// Seals exported volume `name` with `seal`.
    fn set_seal(&self, name: &str, seal: &Seal) -> Result<()>;

    /// Lifts the seal of exported volume `name`.
    fn remove_seal(&self, name: &str) -> Result<()>;
}

/// A sender's records of one volume in a store: its journal and its
/// source record.
#[derive(Debug, Clone)]
pub struct SenderJournal {
    store: Arc<dyn Store>,
    volume: SenderVolume,
}

impl SenderJournal {
    /// The records of `volume` in `store`.
    pub fn new(store: Arc<dyn Store>, volume: SenderVolume) -> Self {
        SenderJournal { store, volume }
    }

    /// The volume these records are of.
    pub fn volume(&self) -> &SenderVolume {
        &self.volume
    }

    /// Every record of the journal, oldest first (see [`Store::sender_records`]).
    pub fn read(&self) -> Result<Vec<SenderRecord>> {
        self.store.sender_records(&self.volume)
    }

    /// Appends `record` to the journal, durably.
    pub fn append(&self, record: &SenderRecord) -> Result<()> {
        self.store.append_sender_record(&self.volume, record)
    }

    /// The source record, if any.
    pub fn source(&self) -> Result<Option<SourceRecord>> {
        self.store.source(&self.volume)
    }

    /// Records the source, durably.
    pub fn set_source(&self, source: &SourceRecord) -> Result<()> {
        self.store.set_source(&self.volume, source)
    }
}
