//! Sealed volumes: after a cutover the receiver refuses every later pass of
//! the volume, whatever the sender's state directory holds, until the
//! operator runs `nightpass unseal NAME` on the receiver host; and a peer
//! cannot record a cutover (nor seal a volume) with a consistency point the
//! receiver does not hold.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nightpass::net::transport::{self, Identity, Tuning};
use nightpass_proto::wire::{self, control::Msg, Mode};
use serde_json::Value;

use crate::harness::*;

/// The same sender identity with another, empty state directory: its own
/// record of the cutover cannot be what refuses a pass.
fn fresh_state(sender: &SenderSide, root: &Path) -> SenderSide {
    SenderSide {
        id: Ident {
            dir: sender.id.dir.clone(),
            fp: sender.id.fp.clone(),
        },
        state: root.join("fresh-state"),
    }
}

fn volume_state(rstate: &Path, name: &str) -> PathBuf {
    rstate.join("volumes").join(name)
}

/// The receiver journal's records of one kind.
fn journal(rstate: &Path, name: &str, event: &str) -> Vec<Value> {
    std::fs::read_to_string(volume_state(rstate, name).join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == event)
        .collect()
}

/// `nightpass unseal NAME --state-dir DIR --json`.
fn unseal(name: &str, state_dir: &Path) -> Run {
    let mut c = Command::new(bin());
    c.args(["unseal", name, "--json", "--state-dir"])
        .arg(state_dir);
    run_command(c)
}

/// A record session as a peer runs it by hand: Hello(RECORD), the Welcome,
/// then `mark`; returns the receiver's answer.
async fn record(id: &Identity, port: u16, fp: &str, volume: &str, mark: wire::Mark) -> Msg {
    let mut peer = AuthorizedPeer::connect(id, port, fp, &Tuning::default()).await;
    peer.hello(hello_for(volume, Mode::Record, 0, 0))
        .await
        .unwrap();
    peer.expect_welcome().await;
    // A 1 MiB mark may not all be read before the receiver answers.
    let _ = transport::send_control(&mut peer.send, Msg::Mark(mark)).await;
    let answer = tokio::time::timeout(Duration::from_secs(20), peer.answer())
        .await
        .expect("the receiver answers a mark within 20 s")
        .unwrap()
        .expect("an answer, not the end of the stream");
    peer.close().await;
    answer
}

/// The Welcome a sync session of `volume` gets (the session is then closed,
/// for sure before the runtime goes).
async fn sync_welcome(id: &Identity, port: u16, fp: &str, volume: &str, size: u64) -> Msg {
    let mut peer = AuthorizedPeer::connect(id, port, fp, &Tuning::default()).await;
    let hello = wire::Hello {
        pass_id: vec![7; 16],
        ..hello_for(volume, Mode::Sync, size, 64 << 10)
    };
    peer.hello(hello).await.unwrap();
    let answer = peer.answer().await.unwrap().unwrap();
    peer.close().await;
    answer
}

fn mark(consistency_point: String) -> wire::Mark {
    wire::Mark {
        consistency_point,
        freeze_unix_s: 1_795_983_532.0,
        frozen_s: 0.5,
        ..Default::default()
    }
}

/// Item 1: a real cutover seals the volume on the receiver; a stray sync
/// from a sender with no record of that cutover is refused and writes
/// nothing; verify is still allowed and forgets nothing; `nightpass unseal`
/// (while serve runs) lets passes in again, and the next pass overwrites
/// what the "new site" wrote.
#[test]
fn cutover_seals_the_volume_until_unseal() {
    let (dir, source, target, sender, rx) =
        source_and_volume("source.img", "target.img", 8 * MIB, 41);
    let root = dir.path();
    let rstate = rx.state.clone();
    let dest = rx.dest("v");
    sender.sync_ok(&source, &rx, "v", "first sync");
    write_at(&source, 3 * MIB, &[0x5a; 200_000]);
    sender.sync_ok(&source, &rx, "v", "second sync");

    let r = sender.run("cutover", &source, &dest, &rx.fp, &["--assume-frozen"]);
    assert_eq!(r.code, 0, "cutover: {}", r.stderr);
    let cp = r.event("cutover_end")["consistency_point"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(file_hash(&target), file_hash(&source));

    // The receiver sealed the volume, durably and privately.
    let seal_file = volume_state(&rstate, "v").join("seal");
    let seal: Value = serde_json::from_slice(
        &std::fs::read(&seal_file).expect("the receiver wrote a seal record"),
    )
    .unwrap();
    assert_eq!(seal["consistency_point"], cp.as_str(), "{seal}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&seal_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "seal record mode {mode:o}");
    assert_eq!(journal(&rstate, "v", "cutover").len(), 1);

    // The new site writes to its volume.
    write_at(&target, 5 * MIB, &[0xee; 100_000]);
    let new_site = file_hash(&target);

    // A stray sync, from a state directory that knows nothing of the cutover.
    let stray = fresh_state(&sender, root);
    let r = stray.run("sync", &source, &dest, &rx.fp, &[]);
    assert_eq!(r.code, 2, "a sync of a sealed volume: {}", r.stderr);
    assert!(
        r.stderr.contains(&cp),
        "names the consistency point: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("unseal"),
        "says how to unseal: {}",
        r.stderr
    );
    let at = seal["cutover_at"].as_str().unwrap();
    assert!(
        r.stderr.contains(at),
        "names the cutover's time {at}: {}",
        r.stderr
    );
    assert_eq!(
        file_hash(&target),
        new_site,
        "the sealed target was written"
    );

    // Verify reads and is allowed; its Forget leaves the sealed manifest be.
    let manifest = receiver_manifest(&rstate, "v");
    let before = std::fs::read(&manifest).unwrap();
    let r = stray.run("verify", &source, &dest, &rx.fp, &[]);
    assert_eq!(
        r.code, 1,
        "verify of a sealed volume finds the new site's writes: {}",
        r.stderr
    );
    assert_eq!(
        std::fs::read(&manifest).unwrap(),
        before,
        "verify changed a sealed manifest"
    );
    assert_eq!(file_hash(&target), new_site);

    // Unseal while serve runs.
    let u = unseal("v", &rstate);
    assert_eq!(u.code, 0, "unseal: {}", u.stderr);
    let ev = u.event("unsealed");
    assert_eq!(ev["volume"], "v");
    assert_eq!(ev["consistency_point"], cp.as_str());
    // What the new site changed is learnt by the next pass, not here.
    assert!(ev.get("changed_chunks").is_none(), "{ev}");
    assert!(
        volume_state(&rstate, "v").join("rebuild").exists(),
        "unseal did not mark the manifest to be rebuilt"
    );
    assert!(!seal_file.exists(), "the seal is still there");
    let unsealed = journal(&rstate, "v", "unsealed");
    assert_eq!(unsealed.len(), 1, "{unsealed:?}");
    assert_eq!(unsealed[0]["consistency_point"], cp.as_str());

    // A sync session's Welcome now says which cutover was unsealed.
    let id = Identity::load(&sender.id.dir).unwrap();
    match runtime().block_on(sync_welcome(&id, rx.port, &rx.fp, "v", 8 * MIB)) {
        Msg::Welcome(w) => assert_eq!(w.unsealed_cutover, cp),
        other => panic!("expected a welcome after unseal, got {other:?}"),
    }

    // Passes are accepted again, and overwrite the new site's writes.
    stray.sync_ok(&source, &rx, "v", "sync after unseal");
    assert_eq!(
        file_hash(&target),
        file_hash(&source),
        "the pass after unseal left the new site's writes (a manifest stale since the cutover)"
    );
}

/// Review item 2: what the new site writes AFTER the unseal (it may still be
/// writing then) is overwritten by the next pass: that pass rebuilds the
/// manifest from a read of the target it makes while holding the volume,
/// not from one made at unseal time.
#[test]
fn writes_after_unseal_are_overwritten_by_the_next_pass() {
    // 512 chunks, one of them written after the unseal: the random sample
    // at the next session's start would almost never find it.
    let (dir, source, target, sender, rx) =
        source_and_volume("source.img", "target.img", 32 * MIB, 43);
    let root = dir.path();
    let dest = rx.dest("v");
    for pass in ["first", "second"] {
        sender.sync_ok(&source, &rx, "v", &format!("{pass} sync"));
    }
    let r = sender.run("cutover", &source, &dest, &rx.fp, &["--assume-frozen"]);
    assert_eq!(r.code, 0, "cutover: {}", r.stderr);

    let u = unseal("v", &rx.state);
    assert_eq!(u.code, 0, "unseal: {}", u.stderr);
    // The new site is still writing.
    write_at(&target, 19 * MIB + 3, &[0xee; 5_000]);
    assert_ne!(file_hash(&target), file_hash(&source));

    let stray = fresh_state(&sender, root);
    stray.sync_ok(&source, &rx, "v", "sync after unseal");
    assert_eq!(
        file_hash(&target),
        file_hash(&source),
        "the pass after unseal skipped what the new site wrote after the unseal"
    );
    assert!(
        !volume_state(&rx.state, "v").join("rebuild").exists(),
        "the pass left the rebuild mark"
    );
    // And the rebuilt manifest is trusted: a verify finds nothing to resend.
    let r = stray.run("verify", &source, &dest, &rx.fp, &[]);
    assert_eq!(r.code, 0, "verify after the pass: {}", r.stderr);
}

/// Item 14: a peer that holds an authorized key cannot write a cutover into
/// a volume's journal, nor seal it, with a consistency point the receiver
/// does not hold, nor with one a mebibyte long. The receiver's own root is
/// recorded, and seals.
#[test]
fn record_session_checks_the_consistency_point() {
    let (_dir, source, target, sender, rx) =
        source_and_volume("source.img", "target.img", 4 * MIB, 43);
    let rstate = rx.state.clone();
    let dest = rx.dest("v");
    let r = sender.sync_ok(&source, &rx, "v", "sync");
    let root_hex = r.event("pass_end")["root"].as_str().unwrap().to_string();
    assert_eq!(root_hex.len(), 64);
    let seal_file = volume_state(&rstate, "v").join("seal");

    let id = Identity::load(&sender.id.dir).unwrap();
    let rt = runtime();
    let not_ours = "0123456789abcdef".repeat(4);
    let huge = "a".repeat(1 << 20);
    for (cp, expect) in [
        (not_ours.clone(), "is not what this receiver holds"),
        (huge, "not 64 hex characters"),
    ] {
        let answer = rt.block_on(record(&id, rx.port, &rx.fp, "v", mark(cp)));
        match answer {
            Msg::Failure(f) => assert!(f.message.contains(expect), "{}", f.message),
            other => panic!("a bad mark was answered {other:?}"),
        }
        assert!(
            journal(&rstate, "v", "cutover").is_empty(),
            "a bad mark was journaled"
        );
        assert!(!seal_file.exists(), "a bad mark sealed the volume");
        assert!(rx.log().contains(expect), "{}", rx.log());
    }
    // Passes still run.
    sender.sync_ok(&source, &rx, "v", "sync after refused marks");

    // The receiver's own root is recorded and seals the volume.
    match rt.block_on(record(&id, rx.port, &rx.fp, "v", mark(root_hex.clone()))) {
        Msg::Done(_) => {}
        other => panic!("the true consistency point was answered {other:?}"),
    }
    let cut = journal(&rstate, "v", "cutover");
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0]["consistency_point"], root_hex.as_str());
    assert!(seal_file.exists());
    let before = file_hash(&target);
    write_at(&source, 0, &[1; 70_000]);
    let r = sender.run("sync", &source, &dest, &rx.fp, &[]);
    assert_eq!(r.code, 2, "sync of a sealed volume: {}", r.stderr);
    assert!(r.stderr.contains(&root_hex), "{}", r.stderr);
    assert!(r.stderr.contains("2026-11-29T20:18:52Z"), "{}", r.stderr);
    assert_eq!(file_hash(&target), before);
}

/// `nightpass unseal` of a volume that is not sealed, or in a state
/// directory that does not exist, is bad input: exit 2 and says so.
#[test]
fn unseal_refuses_what_is_not_sealed() {
    let (dir, source, _target, sender, rx) =
        source_and_volume("source.img", "target.img", 2 * MIB, 45);
    let root = dir.path();
    sender.sync_ok(&source, &rx, "v", "sync");
    let before = std::fs::read(receiver_manifest(&rx.state, "v")).unwrap();

    let u = unseal("v", &rx.state);
    assert_eq!(u.code, 2, "unseal of a volume never sealed: {}", u.stderr);
    assert!(u.stderr.contains("'v' is not sealed"), "{}", u.stderr);
    assert!(u.all("unsealed").is_empty());
    assert_eq!(u.event("error")["exit_code"], 2);
    assert!(journal(&rx.state, "v", "unsealed").is_empty());
    assert_eq!(
        std::fs::read(receiver_manifest(&rx.state, "v")).unwrap(),
        before
    );

    let u = unseal("v", &root.join("no-such-state"));
    assert_eq!(u.code, 2, "{}", u.stderr);
    assert!(u.stderr.contains("does not exist"), "{}", u.stderr);
}

/// A group's record is checked whole before any volume is sealed: a group
/// naming the true root of `v` and a volume this receiver does not export
/// (or a false root) seals nothing, journals nothing, and says so; the
/// same group of `v` alone with its true root seals it, with the group's
/// point in its journal.
#[test]
fn a_group_record_seals_every_volume_or_none() {
    let (_dir, source, _target, sender, rx) =
        source_and_volume("source.img", "target.img", 4 * MIB, 47);
    let rstate = rx.state.clone();
    let r = sender.sync_ok(&source, &rx, "v", "sync");
    let root = r.event("pass_end")["root"].as_str().unwrap().to_string();
    let seal_file = volume_state(&rstate, "v").join("seal");
    let id = Identity::load(&sender.id.dir).unwrap();
    let rt = runtime();
    let member = |volume: &str, cp: &str| wire::MarkMember {
        volume: volume.into(),
        consistency_point: cp.into(),
    };
    let group = |members: Vec<wire::MarkMember>| wire::Mark {
        group_point: "ab".repeat(32),
        group_volumes: members.iter().map(|m| m.volume.clone()).collect(),
        members,
        ..mark(root.clone())
    };
    let not_ours = "0123456789abcdef".repeat(4);
    for (members, expect) in [
        (vec![member("v", &root), member("w", &root)], "not exported"),
        (
            vec![member("v", &not_ours)],
            "is not what this receiver holds",
        ),
        (vec![member("v", &root), member("v", &root)], "twice"),
    ] {
        match rt.block_on(record(&id, rx.port, &rx.fp, "v", group(members))) {
            Msg::Failure(f) => {
                assert!(f.message.contains(expect), "{}", f.message);
                assert!(
                    f.message.contains("no volume of the group is sealed"),
                    "{}",
                    f.message
                );
            }
            other => panic!("a bad group was answered {other:?}"),
        }
        assert!(!seal_file.exists(), "a bad group sealed v");
        assert!(journal(&rstate, "v", "cutover").is_empty());
    }
    match rt.block_on(record(
        &id,
        rx.port,
        &rx.fp,
        "v",
        group(vec![member("v", &root)]),
    )) {
        Msg::Done(_) => {}
        other => panic!("the true group was answered {other:?}"),
    }
    assert!(seal_file.exists());
    let cut = journal(&rstate, "v", "cutover");
    assert_eq!(cut[0]["group_point"], "ab".repeat(32).as_str(), "{cut:?}");
}
