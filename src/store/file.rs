//! The file store: the [`Store`] kept as files in a state directory.
//!
//! Owns where each volume's records live under the state directory: a
//! sender's under `targets/<receiver fingerprint>/<volume name>/`
//! (`journal.jsonl`, `source`), a receiver's under `volumes/<name>/`
//! (`journal.jsonl`, `seal`), the layout earlier releases wrote, so their
//! state reads as it is. The formats are [`super::journal`]'s, [`state`]'s and
//! [`seal`]'s; the manifests beside these files are [`state`]'s and never
//! go through the store. It must not decide what a record means.

use std::path::{Path, PathBuf};

use super::journal::{Journal, ReceiverRecord, SenderRecord};
use super::seal::{self, Seal};
use super::state::{self, SourceRecord};
use super::{SenderVolume, Store};
use crate::error::{Error, Result};

/// The records of a state directory, as files.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// The file store of the state directory `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        FileStore {
            root: state_dir.to_owned(),
        }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a sender keeps its state of `volume` (records and manifest):
    /// `targets/<fingerprint>/<name>/`.
    pub fn sender_dir(&self, volume: &SenderVolume) -> PathBuf {
        self.root
            .join("targets")
            .join(state::key_for(&volume.receiver))
            .join(state::key_for(&volume.name))
    }

    /// Where a receiver keeps its state of exported volume `name` (records,
    /// manifest, target record): `volumes/<name>/`.
    pub fn receiver_dir(&self, name: &str) -> PathBuf {
        self.root.join("volumes").join(state::key_for(name))
    }
}

impl Store for FileStore {
    fn append_sender_record(&self, volume: &SenderVolume, record: &SenderRecord) -> Result<()> {
        Journal::in_dir(&self.sender_dir(volume)).append(record)
    }

    fn sender_records(&self, volume: &SenderVolume) -> Result<Vec<SenderRecord>> {
        Journal::in_dir(&self.sender_dir(volume)).read()
    }

    fn source(&self, volume: &SenderVolume) -> Result<Option<SourceRecord>> {
        SourceRecord::read(&self.sender_dir(volume))
    }

    fn set_source(&self, volume: &SenderVolume, source: &SourceRecord) -> Result<()> {
        source.write(&self.sender_dir(volume))
    }

    fn append_receiver_record(&self, name: &str, record: &ReceiverRecord) -> Result<()> {
        Journal::in_dir(&self.receiver_dir(name)).append(record)
    }

    fn receiver_records(&self, name: &str) -> Result<Vec<ReceiverRecord>> {
        Journal::in_dir(&self.receiver_dir(name)).read()
    }

    fn seal(&self, name: &str) -> Result<Option<Seal>> {
        seal::read(&self.receiver_dir(name)).map_err(Error::Io)
    }

    fn set_seal(&self, name: &str, seal: &Seal) -> Result<()> {
        seal::write(&self.receiver_dir(name), seal)
    }

    fn remove_seal(&self, name: &str) -> Result<()> {
        seal::remove(&self.receiver_dir(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use crate::store::journal::{
        CutoverRecord, PassRecord, ReceiverCutoverRecord, ReceiverUnsealedRecord, TargetReadRecord,
        UnsealedRecord,
    };
    use crate::store::SenderJournal;

    const CP: &str = "9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98";

    fn volume() -> SenderVolume {
        SenderVolume {
            receiver: "ab:cd/ef".into(),
            name: "filer01".into(),
        }
    }

    fn sender_records() -> Vec<SenderRecord> {
        vec![
            SenderRecord::Pass(PassRecord {
                kind: "sync".into(),
                source: "/dev/vg0/filer01".into(),
                volume: "10.0.0.2:7400/filer01".into(),
                pass: 1,
                first: true,
                attempts: Some(1),
                root: CP.into(),
                ..PassRecord::default()
            }),
            SenderRecord::TargetRead(TargetReadRecord {
                size_bytes: 1 << 30,
                duration_s: 4.0,
            }),
            SenderRecord::Cutover(CutoverRecord {
                volume: "10.0.0.2:7400/filer01".into(),
                consistency_point: CP.into(),
                freeze_unix_s: 1_796_000_100.5,
                frozen_s: 3.25,
                passes_s: Some(3.0),
                method: "fsfreeze".into(),
                proved: true,
                forecast_s: Some(2.5),
                proof: Some("full".into()),
                proof_s: Some(0.5),
            }),
            SenderRecord::Unsealed(UnsealedRecord {
                consistency_point: CP.into(),
                unix_s: 1_796_000_200.0,
            }),
        ]
    }

    fn seal() -> Seal {
        Seal {
            volume: "filer01".into(),
            consistency_point: CP.into(),
            cutover_unix_s: 1_796_000_100.5,
            cutover_at: "2026-11-30T01:11:40Z".into(),
            frozen_s: 3.25,
            sealed_unix_s: 1_796_000_101.0,
        }
    }

    #[test]
    fn sender_records_round_trip_where_earlier_releases_kept_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let at = dir.path().join("targets/ab_cd_ef/filer01");
        assert_eq!(store.sender_dir(&volume()), at);
        let journal = SenderJournal::new(Arc::new(store.clone()), volume());
        assert_eq!(journal.read().unwrap(), Vec::new());
        assert_eq!(journal.source().unwrap(), None);
        for r in sender_records() {
            journal.append(&r).unwrap();
        }
        assert_eq!(journal.read().unwrap(), sender_records());
        let source = SourceRecord {
            path: "/dev/dm-3".into(),
            recorded_unix_s: 1_796_000_000.0,
        };
        journal.set_source(&source).unwrap();
        assert_eq!(journal.source().unwrap(), Some(source));
        // The files are where the file formats say, private to their owner.
        let j = at.join(crate::store::journal::FILE_NAME);
        assert_eq!(
            Journal::<SenderRecord>::at(j.clone()).read().unwrap(),
            sender_records()
        );
        assert_eq!(
            fs::metadata(&j).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(at.join("source").is_file());
    }

    #[test]
    fn receiver_records_and_seals_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert_eq!(
            store.receiver_dir("filer01"),
            dir.path().join("volumes/filer01")
        );
        let records = vec![
            ReceiverRecord::Cutover(ReceiverCutoverRecord {
                volume: "filer01".into(),
                consistency_point: CP.into(),
                freeze_unix_s: 1_796_000_100.5,
                frozen_s: 3.25,
                sealed_at: Some("2026-11-30T01:12:09Z".into()),
                group_point: None,
                group_volumes: Vec::new(),
            }),
            ReceiverRecord::Unsealed(ReceiverUnsealedRecord {
                volume: "filer01".into(),
                consistency_point: CP.into(),
                cutover_at: "2026-11-30T01:12:09Z".into(),
                unsealed_at: "2026-11-30T09:00:00Z".into(),
            }),
        ];
        assert_eq!(store.receiver_records("filer01").unwrap(), Vec::new());
        for r in &records {
            store.append_receiver_record("filer01", r).unwrap();
        }
        assert_eq!(store.receiver_records("filer01").unwrap(), records);
        assert_eq!(store.seal("filer01").unwrap(), None);
        store.set_seal("filer01", &seal()).unwrap();
        assert_eq!(store.seal("filer01").unwrap(), Some(seal()));
        let path = seal::seal_path(&store.receiver_dir("filer01"));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        store.remove_seal("filer01").unwrap();
        assert_eq!(store.seal("filer01").unwrap(), None);
        // Another volume's records are its own.
        assert_eq!(store.receiver_records("filer02").unwrap(), Vec::new());
    }

    #[test]
    fn a_record_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let journal = SenderJournal::new(Arc::new(store.clone()), volume());
        journal.append(&sender_records()[0]).unwrap();
        let path = store
            .sender_dir(&volume())
            .join(crate::store::journal::FILE_NAME);
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":2,\"event\":\"pass\",\"pass\":2}\n")
            .unwrap();
        let e = journal.read().unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e:?}");
        assert!(e.to_string().contains("format 2"), "{e}");
        // The receiver's journal likewise.
        store
            .append_receiver_record(
                "v",
                &ReceiverRecord::Unsealed(ReceiverUnsealedRecord {
                    volume: "v".into(),
                    consistency_point: CP.into(),
                    cutover_at: "a".into(),
                    unsealed_at: "b".into(),
                }),
            )
            .unwrap();
        let path = store
            .receiver_dir("v")
            .join(crate::store::journal::FILE_NAME);
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":7,\"event\":\"cutover\"}\n").unwrap();
        let e = store.receiver_records("v").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("format 7"), "{e}");
    }

    #[test]
    fn unreadable_records_are_errors_not_empty_histories() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let journal = SenderJournal::new(Arc::new(store.clone()), volume());
        // A journal, a source record and a seal that exist but cannot be
        // read (directories where the files should be).
        let sender = store.sender_dir(&volume());
        fs::create_dir_all(sender.join(crate::store::journal::FILE_NAME)).unwrap();
        fs::create_dir_all(sender.join("source")).unwrap();
        let receiver = store.receiver_dir("v");
        fs::create_dir_all(receiver.join(crate::store::journal::FILE_NAME)).unwrap();
        fs::create_dir_all(seal::seal_path(&receiver)).unwrap();
        for e in [
            journal.read().unwrap_err(),
            journal.source().unwrap_err(),
            store.receiver_records("v").unwrap_err(),
            store.seal("v").unwrap_err(),
        ] {
            assert!(matches!(e, Error::Io(_)), "{e:?}");
            assert_eq!(e.exit_code(), 3);
            assert!(
                e.to_string().contains(&dir.path().display().to_string()),
                "{e}"
            );
        }
        // A seal record that is not a seal is unreadable too (counted as sealed).
        let other = store.receiver_dir("w");
        fs::create_dir_all(&other).unwrap();
        fs::write(seal::seal_path(&other), b"{torn").unwrap();
        let e = store.seal("w").unwrap_err();
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }
}
