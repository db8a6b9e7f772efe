//! What the fleet's tables must show after agents worked: every volume's
//! history a legal path of the state machine, never one volume held by
//! two agents at once (passes and history against each other), fencing
//! tokens that only grow, every pass row completed, every pass an agent
//! printed recorded, a cut-over filer's points.
//!
//! Reads the database and the agents' finished runs only; starts and
//! stops nothing.

use serde_json::Value;

use crate::harness::{Postgres, Run};

/// The state machine's legal moves (`-` is a volume's first row, from
/// nothing). A pass may leave a volume where it was (converging,
/// ready, failed); an operator's `fleet resume` may make a failed volume
/// pending again; a failed night may leave its volumes ready, converging
/// or failed.
const LEGAL: &[(&str, &[&str])] = &[
    ("-", &["pending"]),
    ("pending", &["copying"]),
    ("copying", &["converging", "ready", "failed"]),
    ("converging", &["converging", "ready", "failed"]),
    ("ready", &["ready", "converging", "failed", "cutting_over"]),
    (
        "failed",
        &["pending", "copying", "converging", "ready", "failed"],
    ),
    (
        "cutting_over",
        &["cut_over", "ready", "converging", "failed"],
    ),
    ("cut_over", &[]),
];

fn legal(from: &str, to: &str) -> bool {
    LEGAL.iter().any(|(f, tos)| *f == from && tos.contains(&to))
}

/// Every volume's history is a legal path: it starts from nothing at
/// `pending`, each row starts where the one before ended, each move is
/// legal, and it ends in the volume's state now.
#[track_caller]
pub fn assert_history_legal(pg: &Postgres) {
    let rows = pg.query(
        "SELECT v.name, coalesce(h.from_state, '-'), h.to_state, coalesce(h.agent, '-'), \
         coalesce(h.token::text, '-'), v.state \
         FROM nightpass.history h JOIN nightpass.volumes v ON v.id = h.volume \
         ORDER BY v.name, h.id",
    );
    let mut by_volume: Vec<(String, Vec<&Vec<String>>)> = Vec::new();
    for r in &rows {
        match by_volume.last_mut() {
            Some((v, rs)) if *v == r[0] => rs.push(r),
            _ => by_volume.push((r[0].clone(), vec![r])),
        }
    }
    let volumes = pg.query("SELECT name FROM nightpass.volumes ORDER BY name");
    assert_eq!(
        by_volume.len(),
        volumes.len(),
        "a volume without history: {volumes:?}\n{rows:?}"
    );
    for (v, rs) in &by_volume {
        let path: Vec<String> = rs
            .iter()
            .map(|r| format!("{}→{} ({} token {})", r[1], r[2], r[3], r[4]))
            .collect();
        let mut at = "-".to_string();
        for r in rs {
            assert_eq!(
                r[1], at,
                "{v}: a history row starts at {} where the last ended at {at}: {path:#?}",
                r[1]
            );
            assert!(
                legal(&r[1], &r[2]),
                "{v}: {}→{} is not a move of the state machine: {path:#?}",
                r[1],
                r[2]
            );
            at = r[2].clone();
        }
        assert_eq!(
            at, rs[0][5],
            "{v}: its history ends at {at}, its state is {}: {path:#?}",
            rs[0][5]
        );
    }
}

/// The `VALUES` rows of agents killed by SIGKILL and the database's epoch
/// seconds when they were (their unended passes end there).
fn killed_values(killed: &[(&str, f64)]) -> String {
    if killed.is_empty() {
        return "VALUES (NULL::text, NULL::timestamptz)".into();
    }
    let rows: Vec<String> = killed
        .iter()
        .map(|(a, t)| format!("('{a}', to_timestamp({t}))"))
        .collect();
    format!("VALUES {}", rows.join(", "))
}

/// Every pass row was completed (`ok` and `ended_at` set), but those of
/// the agents in `killed` (killed mid-pass, which never could).
#[track_caller]
pub fn assert_every_pass_ended(pg: &Postgres, killed: &[(&str, f64)]) {
    let names: Vec<String> = killed.iter().map(|(a, _)| format!("'{a}'")).collect();
    let except = if names.is_empty() {
        String::new()
    } else {
        format!("AND p.agent NOT IN ({})", names.join(", "))
    };
    let open = pg.query(&format!(
        "SELECT v.name, p.agent, p.token, p.at, coalesce(p.ok::text, 'NULL'), \
         coalesce(p.ended_at::text, 'NULL') FROM nightpass.passes p \
         JOIN nightpass.volumes v ON v.id = p.volume \
         WHERE (p.ok IS NULL OR p.ended_at IS NULL) {except}"
    ));
    assert!(
        open.is_empty(),
        "pass rows never completed (volume, agent, token, at, ok, ended_at): {open:#?}"
    );
}

/// No volume was ever held by two agents at once: no two passes of one
/// volume under different agents overlap in time (a pass of an agent in
/// `killed` ends when it was killed, an unended one of another agent
/// never), and no agent changed a volume's state while another agent's
/// pass of it was in flight. Fencing tokens only grow: a token is one
/// agent's, a volume's passes in time order and its history rows in order
/// carry tokens that never go down, and a new agent's are larger.
#[track_caller]
pub fn assert_one_holder(pg: &Postgres, killed: &[(&str, f64)]) {
    let passes = format!(
        "WITH k(agent, killed_at) AS ({}), \
         p AS (SELECT p.id, p.volume, p.agent, p.token, p.at, p.kind, \
               coalesce(p.ended_at, k.killed_at, 'infinity'::timestamptz) AS until \
               FROM nightpass.passes p LEFT JOIN k ON k.agent = p.agent)",
        killed_values(killed)
    );
    let overlaps = pg.query(&format!(
        "{passes} SELECT v.name, a.agent, a.token, a.kind, a.at, a.until, \
         b.agent, b.token, b.kind, b.at, b.until \
         FROM p a JOIN p b ON a.volume = b.volume AND a.id < b.id AND a.agent <> b.agent \
         JOIN nightpass.volumes v ON v.id = a.volume \
         WHERE a.at < b.until AND b.at < a.until"
    ));
    assert!(
        overlaps.is_empty(),
        "passes of one volume under two agents at once \
         (volume, agent, token, kind, at, until, agent, token, kind, at, until): {overlaps:#?}"
    );
    let meddled = pg.query(&format!(
        "{passes} SELECT v.name, h.from_state, h.to_state, h.agent, h.token, h.at, \
         p.agent, p.token, p.at, p.until \
         FROM nightpass.history h JOIN p ON p.volume = h.volume \
         JOIN nightpass.volumes v ON v.id = h.volume \
         WHERE h.agent IS NOT NULL AND h.token IS NOT NULL AND h.agent <> p.agent \
         AND h.at > p.at AND h.at < p.until"
    ));
    assert!(
        meddled.is_empty(),
        "an agent changed a volume while another agent's pass of it was in flight \
         (volume, from, to, agent, token, at, pass agent, token, at, until): {meddled:#?}"
    );
    let shared = pg.query(
        "SELECT token, string_agg(DISTINCT agent, ', ') FROM \
         (SELECT token, agent FROM nightpass.passes \
          UNION SELECT token, agent FROM nightpass.history \
          WHERE token IS NOT NULL AND agent IS NOT NULL) t \
         GROUP BY token HAVING count(DISTINCT agent) > 1",
    );
    assert!(
        shared.is_empty(),
        "a fencing token held by two agents (token, agents): {shared:#?}"
    );
    assert_tokens_grow(pg, "passes", "p.at, p.id");
    assert_tokens_grow(pg, "history", "p.id");
}

/// In `table`, each volume's rows in `order` carry tokens that never go
/// down, and that grow when the agent changes.
#[track_caller]
fn assert_tokens_grow(pg: &Postgres, table: &str, order: &str) {
    let rows = pg.query(&format!(
        "SELECT v.name, p.agent, p.token FROM nightpass.{table} p \
         JOIN nightpass.volumes v ON v.id = p.volume \
         WHERE p.token IS NOT NULL AND p.agent IS NOT NULL ORDER BY v.name, {order}"
    ));
    for w in rows.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a[0] != b[0] {
            continue;
        }
        let (ta, tb): (i64, i64) = (a[2].parse().unwrap(), b[2].parse().unwrap());
        assert!(
            tb > ta || (tb == ta && a[1] == b[1]),
            "{table} of {}: token {tb} ({}) after token {ta} ({}): fencing tokens must grow",
            a[0],
            b[1],
            a[1]
        );
    }
}

/// The three checks every test makes on the tables after its agents
/// stopped: [`assert_history_legal`], [`assert_one_holder`] and
/// [`assert_every_pass_ended`] (`killed`: agents killed mid-pass, with
/// the database's epoch seconds when they were).
#[track_caller]
pub fn assert_fleet_history(pg: &Postgres, killed: &[(&str, f64)]) {
    assert_history_legal(pg);
    assert_one_holder(pg, killed);
    assert_every_pass_ended(pg, killed);
}

/// The events named `name` of every run, about filer `filer`.
pub fn about<'a>(runs: &[&'a Run], name: &str, filer: &str) -> Vec<&'a Value> {
    runs.iter()
        .flat_map(|r| r.all(name))
        .filter(|e| e["filer"] == filer)
        .collect()
}

/// A cut-over filer's volumes: each `cut_over` with a consistency point
/// (the one of its `cutover_end` in the agents' `runs`); the group point
/// over them, BLAKE3 over the volumes' points in name order, in the one
/// `fleet_cut_over` of the filer and in `filers.group_point`. Returns
/// the group point.
#[track_caller]
pub fn assert_group_point(pg: &Postgres, runs: &[&Run], filer: &str) -> String {
    let rows = pg.query(&format!(
        "SELECT name, coalesce(consistency_point, ''), state FROM nightpass.volumes \
         WHERE filer = '{filer}' ORDER BY name"
    ));
    let mut bytes = Vec::new();
    for r in &rows {
        assert_eq!(r[2], "cut_over", "{r:?}");
        let cp = data_encoding::HEXLOWER
            .decode(r[1].as_bytes())
            .unwrap_or_else(|e| panic!("{}: consistency point {:?}: {e}", r[0], r[1]));
        assert_eq!(cp.len(), 32, "{r:?}");
        bytes.extend(cp);
        let ends: Vec<&Value> = runs
            .iter()
            .flat_map(|run| run.all("cutover_end"))
            .filter(|e| e["volume"] == r[0].as_str())
            .collect();
        assert_eq!(ends.len(), 1, "cutover_end of {}: {ends:?}", r[0]);
        assert_eq!(ends[0]["consistency_point"], r[1].as_str(), "{}", ends[0]);
    }
    let point = blake3::hash(&bytes).to_hex().to_string();
    let done = about(runs, "fleet_cut_over", filer);
    assert_eq!(done.len(), 1, "fleet_cut_over of {filer}: {done:?}");
    assert_eq!(done[0]["consistency_point"], point.as_str(), "{}", done[0]);
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    match &done[0]["volumes"] {
        Value::Array(v) => assert_eq!(v, &names, "{}", done[0]),
        n => assert_eq!(n.as_u64(), Some(names.len() as u64), "{}", done[0]),
    }
    let recorded = pg.scalar(&format!(
        "SELECT coalesce(group_point, '') FROM nightpass.filers WHERE name = '{filer}'"
    ));
    assert_eq!(recorded, point, "filers.group_point of {filer}");
    point
}

/// Every `pass_end` of each agent's run (agent name, run) is in
/// `nightpass.passes` once, ok, under that agent, with the same pass
/// number and bytes sent, and there is no other ok pass row.
#[track_caller]
pub fn assert_pass_ends_recorded(pg: &Postgres, runs: &[(&str, &Run)]) {
    let rows = pg.query(
        "SELECT p.agent, v.name, coalesce(p.record->>'pass', ''), \
         coalesce(p.record->>'sent_bytes', ''), extract(epoch FROM p.ended_at)::text \
         FROM nightpass.passes p JOIN nightpass.volumes v ON v.id = p.volume \
         WHERE p.ok AND p.kind = 'pass'",
    );
    let mut ends = 0;
    for (agent, run) in runs {
        for e in run.all("pass_end") {
            ends += 1;
            let field = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("pass_end.{k}: {e}"));
            let (pass, sent) = (field("pass").to_string(), field("sent_bytes").to_string());
            let found: Vec<&Vec<String>> = rows
                .iter()
                .filter(|r| r[0] == *agent && e["volume"] == r[1].as_str() && r[2] == pass)
                .collect();
            assert_eq!(
                found.len(),
                1,
                "{agent}'s {e} in nightpass.passes: {rows:#?}"
            );
            assert_eq!(found[0][3], sent, "sent_bytes of {agent}'s {e}");
            // Its end is when it ended, not when the record reached the
            // database (a spooled record is sent late).
            let ended: f64 = found[0][4].parse().unwrap();
            let ts = unix_of(e["ts"].as_str().unwrap());
            assert!(
                (ended - ts).abs() < 2.0,
                "ended_at {ended} of {agent}'s {e}"
            );
        }
    }
    assert_eq!(
        rows.len(),
        ends,
        "ok pass rows, not one per pass_end: {rows:#?}"
    );
}

/// Unix seconds of an RFC 3339 UTC time as events carry it
/// (`2026-11-30T04:57:42.689Z`).
fn unix_of(ts: &str) -> f64 {
    let n = |r: std::ops::Range<usize>| ts[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs: f64 = ts[17..ts.len() - 1].parse().unwrap();
    (days * 86400 + n(11..13) * 3600 + n(14..16) * 60) as f64 + secs
}
