//! Journals that cannot be read (issue 14): a volume's history that exists
//! but cannot be read stops the command, naming the file, instead of
//! reading as no history at all (which started the volume over as pass 1).

use std::process::Command;

use crate::harness::*;

#[test]
fn an_unreadable_sender_journal_fails_instead_of_starting_over() {
    let (_root, source, target, sender, rx) =
        source_and_volume("source.img", "target.img", 4 * MIB, 21);
    let r = sender.sync_ok(&source, &rx, "v", "first pass");
    assert_eq!(r.event("pass_end")["pass"], 1);
    // Made unreadable: a directory where the journal was.
    let journal = sender
        .state
        .join("targets")
        .join(&rx.fp)
        .join("v")
        .join("journal.jsonl");
    std::fs::remove_file(&journal).unwrap();
    std::fs::create_dir(&journal).unwrap();
    random_file(&source, 4 * MIB, 22);
    let before = std::fs::read(&target).unwrap();
    let r = sender.run("sync", &source, &rx.dest("v"), &rx.fp, &[]);
    assert_eq!(
        r.code, 3,
        "an unreadable journal is an I/O failure\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&journal.display().to_string()),
        "the error does not name the journal: {}",
        r.stderr
    );
    assert!(
        !r.events.iter().any(|e| e["event"] == "pass_start"),
        "a pass started with the history unread: {:?}",
        r.events
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        before,
        "the target was written"
    );
    // status says so too, rather than listing no passes.
    let out = Command::new(bin())
        .args(["status", "--json", "--state-dir"])
        .arg(&sender.state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&journal.display().to_string()));
}

/// The receiver reads its journal of the volume at each sync session (the
/// last unsealed cutover): unreadable, the session is refused as a failure
/// on its side, naming the file, and nothing is written.
#[test]
fn an_unreadable_receiver_journal_refuses_the_pass() {
    let (_root, source, target, sender, rx) =
        source_and_volume("source.img", "target.img", MIB, 23);
    sender.sync_ok(&source, &rx, "v", "first pass");
    let journal = rx.state.join("volumes/v/journal.jsonl");
    std::fs::create_dir_all(&journal).unwrap();
    random_file(&source, MIB, 24);
    let before = std::fs::read(&target).unwrap();
    let r = sender.run("sync", &source, &rx.dest("v"), &rx.fp, &[]);
    assert_eq!(r.code, 3, "{:?}\n{}", r.events, r.stderr);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        before,
        "the target was written"
    );
    assert!(
        r.stderr.contains("journal.jsonl"),
        "the refusal does not name the receiver's journal: {}",
        r.stderr
    );
}
