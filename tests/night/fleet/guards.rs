//! What `fleet add` and `fleet schedule` refuse, with nothing written: a
//! second filer of one receiver volume or one source, a volume nothing
//! freezes, a night for a filer already cut over or a night already over;
//! and what a re-schedule clears (the filer's failed nights).

use std::path::{Path, PathBuf};

use super::controls::fleet_of;
use super::{events, expect, fleet, init};
use crate::harness::*;

/// Writes `dir/NAME.toml` for `receiver` (address) and `fp` with the filer
/// lines `filer` and the volumes (name, source, fsfreeze).
fn write(
    dir: &Path,
    name: &str,
    (receiver, fp): (&str, &str),
    filer: &str,
    volumes: &[(&str, &Path, Option<&str>)],
) -> PathBuf {
    let mut text = format!("receiver = \"{receiver}\"\nserver_fingerprint = \"{fp}\"\n{filer}\n");
    for (v, source, fsfreeze) in volumes {
        text.push_str(&format!(
            "\n[[volume]]\nname = \"{v}\"\nsource = \"{}\"\n",
            source.display()
        ));
        if let Some(m) = fsfreeze {
            text.push_str(&format!("fsfreeze = \"{m}\"\n"));
        }
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `fleet add PLAN EXTRA…`.
fn add(db: &str, plan: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["add", plan.to_str().unwrap()];
    args.extend_from_slice(extra);
    fleet(db, &args)
}

/// Asserts `run` was refused (exit 2, an `error` event) naming each of
/// `words` on stderr.
#[track_caller]
fn refused(run: &Run, words: &[&str]) {
    expect(run, 2);
    assert_eq!(events(run, "error")[0]["exit_code"], 2, "{}", run.context());
    for w in words {
        assert!(run.stderr.contains(w), "{w:?}: {}", run.context());
    }
}

/// The fleet's filers and volumes, as `filer/volume` in order.
fn registered(pg: &Postgres) -> Vec<String> {
    pg.query("SELECT filer || '/' || name FROM nightpass.volumes ORDER BY filer, name")
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

#[test]
fn add_refuses_a_second_filer_of_one_receiver_volume_or_one_source() {
    let Some(pg) = Postgres::start("fleet::guards::add_refuses_a_second_filer") else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let d = dir.path();
    init(&db);
    let (fp, fp2) = (keygen(d, "rx").fp, keygen(d, "rx2").fp);
    let (a, b, c) = (d.join("a.img"), d.join("b.img"), d.join("c.img"));
    let frozen = "assume_frozen = true";
    let rx = ("127.0.0.1:7400", fp.as_str());
    let f6 = write(d, "f6", rx, frozen, &[("f6a", &a, None), ("f6b", &b, None)]);
    expect(&add(&db, &f6, &["--host", "hostA"]), 0);
    let before = registered(&pg);

    // The same receiver volume from another host: refused, naming both.
    let dup = write(d, "f6dup", rx, frozen, &[("f6a", &c, None)]);
    refused(
        &add(&db, &dup, &["--host", "hostB"]),
        &["f6dup", "'f6'", "f6a"],
    );
    // The same receiver by its key under another address, or by its
    // address under another key: the same.
    let alias = write(
        d,
        "alias",
        ("10.9.9.9:7400", &fp),
        frozen,
        &[("f6a", &c, None)],
    );
    refused(&add(&db, &alias, &["--host", "hostB"]), &["'f6'", "f6a"]);
    let rekeyed = write(
        d,
        "rekeyed",
        ("127.0.0.1:7400", &fp2),
        frozen,
        &[("f6a", &c, None)],
    );
    refused(&add(&db, &rekeyed, &["--host", "hostB"]), &["'f6'", "f6a"]);
    // One source read twice on one host (two filers reading one device).
    let twice = write(
        d,
        "twice",
        ("127.0.0.1:7401", &fp2),
        frozen,
        &[("t", &a, None)],
    );
    refused(
        &add(&db, &twice, &["--host", "hostA"]),
        &["'f6'", "f6a", &a.display().to_string(), "hostA"],
    );
    // The same plan under another name is caught by the same rules.
    refused(
        &add(&db, &f6, &["--host", "hostA", "--filer", "f1copy"]),
        &["'f6'"],
    );
    refused(
        &add(&db, &f6, &["--host", "hostZ", "--filer", "f1copy"]),
        &["'f6'"],
    );
    assert_eq!(registered(&pg), before, "a refused add wrote something");

    // Another receiver's volume of that name, or that source on another
    // host, is no conflict; --replace does not trip over its own rows.
    let other = write(
        d,
        "other",
        ("127.0.0.1:7402", &fp2),
        frozen,
        &[("f6a", &c, None)],
    );
    expect(&add(&db, &other, &["--host", "hostB"]), 0);
    expect(&add(&db, &twice, &["--host", "hostC"]), 0);
    expect(&add(&db, &f6, &["--host", "hostA", "--replace"]), 0);
    assert_eq!(
        registered(&pg),
        ["f6/f6a", "f6/f6b", "other/f6a", "twice/t"]
    );
}

/// A plan whose volume nothing would freeze is registered for its
/// daytime passes with a warning naming the volume and what to add
/// (without reading its sources), and its night is refused.
#[test]
fn a_volume_nothing_freezes_is_warned_at_add_and_its_night_refused() {
    let Some(pg) = Postgres::start("fleet::guards::a_volume_nothing_freezes") else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let d = dir.path();
    init(&db);
    let fp = keygen(d, "rx").fp;
    let rx = ("127.0.0.1:7400", fp.as_str());
    // Sources that are nowhere, on another host: not read.
    let (gone, gone2) = (
        Path::new("/dev/vg-nowhere/gone"),
        Path::new("/dev/vg-nowhere/gone2"),
    );
    let bare = write(
        d,
        "bare",
        rx,
        "",
        &[("frozen", gone, Some("/srv/a")), ("loose", gone2, None)],
    );
    let run = add(&db, &bare, &["--host", "hostB"]);
    expect(&run, 0);
    let warning = run.event("fleet_filer_added")["warning"]
        .as_str()
        .unwrap_or_else(|| panic!("no warning: {}", run.context()))
        .to_string();
    for word in ["'loose'", "fsfreeze", "assume_frozen", "pre"] {
        assert!(warning.contains(word), "{word}: {warning}");
    }
    assert!(!warning.contains("'frozen'"), "{warning}");
    assert!(run.stderr.contains("'loose'"), "{}", run.context());
    let mut c = std::process::Command::new(bin());
    c.args([
        "--json",
        "fleet",
        "schedule",
        "bare",
        "--at",
        "2096-12-03T01:00:00Z",
    ]);
    c.args(["--window", "2h"]).env("NIGHTPASS_DB", &db);
    let night = run_command(c);
    refused(&night, &["'loose'", "fsfreeze"]);
    let nights = pg.query("SELECT filer FROM nightpass.schedules");
    assert!(nights.is_empty(), "{nights:?}");
    // A filer's freeze covers every volume.
    let rx2 = ("127.0.0.1:7401", fp.as_str());
    let hooks = write(
        d,
        "hooks",
        rx2,
        "pre = \"true\"\npost = \"true\"",
        &[("h", Path::new("/dev/vg-nowhere/gone3"), None)],
    );
    let run = add(&db, &hooks, &["--host", "hostB"]);
    expect(&run, 0);
    assert!(
        run.event("fleet_filer_added")["warning"].is_null(),
        "{}",
        run.context()
    );
    let rx3 = ("127.0.0.1:7402", fp.as_str());
    let assumed = write(
        d,
        "assumed",
        rx3,
        "assume_frozen = true",
        &[("s", Path::new("/dev/vg-nowhere/gone4"), None)],
    );
    expect(&add(&db, &assumed, &["--host", "hostB"]), 0);
    assert_eq!(
        registered(&pg),
        ["assumed/s", "bare/frozen", "bare/loose", "hooks/h"]
    );
}

/// `fleet schedule FILER --at AT --window WINDOW`.
fn schedule(db: &str, filer: &str, at: &str, window: &str) -> Run {
    fleet(db, &["schedule", filer, "--at", at, "--window", window])
}

#[test]
fn schedule_refuses_a_cut_over_filer_or_a_night_over_and_clears_the_last_night() {
    let Some((pg, _dir)) = fleet_of("fleet::guards::schedule_refuses", &[("fs", 1)]) else {
        return;
    };
    let db = pg.url();
    let night = "SELECT coalesce(night_note, '-'), (night_note_at IS NULL)::text, \
                 night_failures::text, (night_retry_at IS NULL)::text \
                 FROM nightpass.filers WHERE name = 'fs'";
    pg.sql(
        "UPDATE nightpass.filers SET night_note = 'group cutover failed', \
         night_note_at = now(), night_failures = 3, \
         night_retry_at = now() + interval '1 hour' WHERE name = 'fs'",
    );
    // A night already over: refused, nothing written.
    let run = schedule(&db, "fs", "2020-01-01T01:00:00Z", "2h");
    refused(&run, &["fs", "over"]);
    assert_eq!(pg.scalar("SELECT count(*) FROM nightpass.schedules"), "0");
    assert_eq!(pg.query(night)[0][2], "3");
    // A night open now (it began ten minutes ago) is taken, and the
    // filer's last night is forgotten.
    let began = pg.scalar(
        "SELECT to_char((now() - interval '10 minutes') AT TIME ZONE 'UTC', \
         'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    );
    expect(&schedule(&db, "fs", &began, "1h"), 0);
    assert_eq!(pg.query(night)[0], ["-", "true", "0", "true"]);
    // A filer already cut over: its volumes are sealed.
    pg.sql("UPDATE nightpass.filers SET cut_over_at = now(), group_point = 'c0ffee'");
    let run = schedule(&db, "fs", "2096-12-03T01:00:00Z", "2h");
    refused(&run, &["filer fs was cut over at", "sealed"]);
    let at =
        pg.scalar("SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM nightpass.schedules");
    assert_ne!(at, "2096-12-03", "the refused schedule was written");
}
