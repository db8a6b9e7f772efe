//! `fleet remove`: a filer added by mistake goes with its volumes and
//! everything of theirs; one in the middle of a pass or a night stays, and
//! one cut over stays unless forced (its rows are the migration's record).

use super::controls::fleet_of;
use super::{events, expect, fleet};

/// What the fleet holds: filers, volumes, leases, history rows.
fn counts(pg: &crate::harness::Postgres) -> Vec<String> {
    pg.query(
        "SELECT (SELECT count(*) FROM nightpass.filers), (SELECT count(*) FROM nightpass.volumes), \
         (SELECT count(*) FROM nightpass.leases), (SELECT count(*) FROM nightpass.history)",
    )
    .remove(0)
}

#[test]
fn remove_a_filer_added_by_mistake_but_not_one_at_work_or_cut_over() {
    let Some((pg, _dir)) = fleet_of("fleet::remove::remove_a_filer", &[("keep", 1), ("oops", 2)])
    else {
        return;
    };
    let db = pg.url();
    let run = fleet(&db, &["remove", "nosuch"]);
    expect(&run, 2);
    assert!(run.stderr.contains("nosuch"), "{}", run.context());

    // In a pass under a live lease: refused.
    pg.sql(
        "UPDATE nightpass.volumes SET state = 'copying' WHERE filer = 'oops' AND name = 'v0'; \
         INSERT INTO nightpass.leases (volume, agent, expires_at, in_pass) \
         SELECT id, 'agent-7', now() + interval '1 hour', true FROM nightpass.volumes \
         WHERE filer = 'oops' AND name = 'v0'",
    );
    let before = counts(&pg);
    let run = fleet(&db, &["remove", "oops", "--force"]);
    expect(&run, 2);
    assert!(
        run.stderr.contains("agent-7") && run.stderr.contains("v0"),
        "{}",
        run.context()
    );
    // Its lease ran out, but another volume is in its night: refused.
    pg.sql(
        "UPDATE nightpass.leases SET expires_at = now() - interval '1 second'; \
         UPDATE nightpass.volumes SET state = 'cutting_over' WHERE filer = 'oops' AND name = 'v1'",
    );
    let run = fleet(&db, &["remove", "oops", "--force"]);
    expect(&run, 2);
    assert!(run.stderr.contains("cutting_over"), "{}", run.context());
    assert_eq!(counts(&pg), before, "a refused remove changed something");
    assert!(events(&run, "fleet_filer_removed").is_empty());

    // Added by mistake: removed with its volumes, lease and history.
    pg.sql("UPDATE nightpass.volumes SET state = 'ready' WHERE filer = 'oops' AND name = 'v1'");
    let run = fleet(&db, &["remove", "oops"]);
    expect(&run, 0);
    let e = events(&run, "fleet_filer_removed")[0];
    assert_eq!(
        (&e["filer"], &e["volumes"]),
        (&"oops".into(), &2.into()),
        "{e}"
    );
    assert_eq!(e["states"]["v0"], "copying", "{e}");
    assert_eq!(e["states"]["v1"], "ready", "{e}");
    assert!(e["ts"].is_string());
    assert_eq!(counts(&pg), ["1", "1", "0", "1"]);
    let log = pg.query(
        "SELECT event, by, detail->>'filer', detail->'states'->>'v1' FROM nightpass.fleet_log",
    );
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0][0].as_str(), log[0][2].as_str()), ("remove", "oops"));
    assert!(log[0][1].starts_with("fleet remove on "), "{log:?}");
    assert_eq!(log[0][3], "ready");

    // Cut over: its history is the record of the migration; only --force.
    pg.sql(
        "UPDATE nightpass.volumes SET state = 'cut_over', consistency_point = 'ab'; \
         UPDATE nightpass.filers SET cut_over_at = now(), group_point = 'c0ffee'",
    );
    let run = fleet(&db, &["remove", "keep"]);
    expect(&run, 2);
    assert!(
        run.stderr.contains("cut over") && run.stderr.contains("--force"),
        "{}",
        run.context()
    );
    assert_eq!(counts(&pg), ["1", "1", "0", "1"]);
    let run = fleet(&db, &["remove", "keep", "--force"]);
    expect(&run, 0);
    assert_eq!(events(&run, "fleet_filer_removed")[0]["cut_over"], true);
    assert_eq!(counts(&pg), ["0", "0", "0", "0"]);
}
