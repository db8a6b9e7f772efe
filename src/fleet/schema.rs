//! The fleet's schema in PostgreSQL and its versioned migrations.
//!
//! Owns every table of the `nightpass` schema and the order they came in:
//! [`MIGRATIONS`] is append-only (a released migration is never edited;
//! a change is a new one), each applied once in its own transaction and
//! recorded in `nightpass.schema_version`. [`init`] applies what is
//! missing under an advisory lock, so running it twice, or on two hosts at
//! once, changes nothing; [`check`] refuses a schema that this binary does
//! not know (too old: run `fleet init`; newer: upgrade nightpass).
//!
//! The tables are laid out for the agent's claims: a volume is claimed
//! with `SELECT … FOR UPDATE OF v SKIP LOCKED` over `volumes` joined to
//! `filers` by host (indexes `filers_host`, `volumes_claimable`), under a
//! row of `leases` whose `token` comes from the sequence `fencing_tokens`,
//! so tokens only grow; every change of a volume is made only while its
//! lease holds that token, and `volumes.fence_token` keeps the highest
//! token that changed it, so an agent that lost its lease can never write
//! after its successor.

use super::db::{sqlstate, Pool};
use crate::error::{Error, Result};

/// The advisory lock `init` holds while it migrates (any constant unique
/// to nightpass: "nightpas" in ASCII).
const INIT_LOCK: i64 = 0x6e69_6768_7470_6173;

/// The migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
pub const MIGRATIONS: &[&str] = &[MIGRATION_1, MIGRATION_2, MIGRATION_3];

/// The schema version this binary reads and writes.
pub fn latest() -> i32 {
    MIGRATIONS.len() as i32
}

/// Version 1: filers, volumes and their state machine, leases with
/// fencing tokens, history, the pass journal, the fleet's settings and
/// the filers' nights.
pub const MIGRATION_1: &str = r#"
CREATE TABLE nightpass.filers (
    name        text PRIMARY KEY CHECK (name <> ''),
    plan_path   text NOT NULL,
    plan        text NOT NULL,
    host        text NOT NULL CHECK (host <> ''),
    receiver    text NOT NULL,
    fingerprint text NOT NULL,
    jobs        integer NOT NULL CHECK (jobs > 0),
    added_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX filers_host ON nightpass.filers (host);

CREATE TABLE nightpass.volumes (
    id              bigserial PRIMARY KEY,
    filer           text NOT NULL REFERENCES nightpass.filers (name) ON DELETE CASCADE,
    name            text NOT NULL,
    source          text NOT NULL,
    fsfreeze        text,
    size_bytes      bigint NOT NULL CHECK (size_bytes >= 0),
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN
                    ('pending', 'copying', 'converging', 'ready',
                     'cutting_over', 'cut_over', 'failed')),
    failure         text,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    fence_token     bigint NOT NULL DEFAULT 0,
    forecast_final_pass_s double precision,
    consistency_point text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (filer, name),
    CHECK (state <> 'failed' OR failure IS NOT NULL)
);
-- What an agent may claim: not done, not cutting over, due.
CREATE INDEX volumes_claimable ON nightpass.volumes (filer, next_attempt_at)
    WHERE state IN ('pending', 'copying', 'converging', 'ready', 'failed');
CREATE INDEX volumes_state ON nightpass.volumes (state);

CREATE SEQUENCE nightpass.fencing_tokens;
CREATE TABLE nightpass.leases (
    volume      bigint PRIMARY KEY REFERENCES nightpass.volumes (id) ON DELETE CASCADE,
    agent       text NOT NULL,
    token       bigint NOT NULL DEFAULT nextval('nightpass.fencing_tokens'),
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    in_pass     boolean NOT NULL DEFAULT false
);
CREATE INDEX leases_expires ON nightpass.leases (expires_at);
CREATE INDEX leases_agent ON nightpass.leases (agent);
CREATE INDEX leases_in_pass ON nightpass.leases (volume) WHERE in_pass;

CREATE TABLE nightpass.history (
    id         bigserial PRIMARY KEY,
    volume     bigint NOT NULL REFERENCES nightpass.volumes (id) ON DELETE CASCADE,
    from_state text,
    to_state   text NOT NULL,
    agent      text,
    token      bigint,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    figures    jsonb
);
CREATE INDEX history_volume_at ON nightpass.history (volume, at);
CREATE INDEX history_at ON nightpass.history (at);

CREATE TABLE nightpass.passes (
    id      bigserial PRIMARY KEY,
    volume  bigint NOT NULL REFERENCES nightpass.volumes (id) ON DELETE CASCADE,
    agent   text NOT NULL,
    token   bigint NOT NULL,
    seq     integer NOT NULL,
    ok      boolean NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    record  jsonb NOT NULL,
    UNIQUE (volume, token, seq)
);
CREATE INDEX passes_volume ON nightpass.passes (volume, id);
CREATE INDEX passes_at ON nightpass.passes (at);

CREATE TABLE nightpass.settings (
    id                      boolean PRIMARY KEY DEFAULT true CHECK (id),
    paused                  boolean NOT NULL DEFAULT false,
    pause_reason            text,
    paused_at               timestamptz,
    paused_by               text,
    max_passes              integer CHECK (max_passes > 0),
    max_passes_per_filer    integer CHECK (max_passes_per_filer > 0),
    max_passes_per_host     integer CHECK (max_passes_per_host > 0),
    max_passes_per_receiver integer CHECK (max_passes_per_receiver > 0),
    error_threshold         integer NOT NULL DEFAULT 3 CHECK (error_threshold > 0),
    error_window            integer NOT NULL DEFAULT 10
                            CHECK (error_window >= error_threshold)
);
INSERT INTO nightpass.settings DEFAULT VALUES;

CREATE TABLE nightpass.schedules (
    filer      text PRIMARY KEY REFERENCES nightpass.filers (name) ON DELETE CASCADE,
    at         timestamptz NOT NULL,
    window_len interval NOT NULL CHECK (window_len > interval '0'),
    set_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_at ON nightpass.schedules (at);
"#;

/// Version 2, for the agents: a pass row is written when the pass starts
/// (`at`; `ok` NULL while it runs) and completed when it ends (`ended_at`,
/// `ok`, `failure`, the record); the retry policy (`max_attempts`, the
/// first `retry_after`, doubled at each failure); a filer's night (why
/// its agent did not cut it over, the group's consistency point); the
/// fleet's own log (the red button pressed and lifted, by whom and why).
pub const MIGRATION_2: &str = r#"
ALTER TABLE nightpass.passes
    ALTER COLUMN ok DROP NOT NULL,
    ALTER COLUMN record DROP NOT NULL,
    ADD COLUMN ended_at timestamptz,
    ADD COLUMN failure text,
    ADD COLUMN kind text NOT NULL DEFAULT 'pass' CHECK (kind IN ('pass', 'cutover'));
CREATE INDEX passes_ended ON nightpass.passes (ended_at) WHERE ok IS NOT NULL;

ALTER TABLE nightpass.settings
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts > 0),
    ADD COLUMN retry_after interval NOT NULL DEFAULT interval '30 seconds'
        CHECK (retry_after >= interval '0');

ALTER TABLE nightpass.filers
    ADD COLUMN night_note text,
    ADD COLUMN night_note_at timestamptz,
    ADD COLUMN group_point text,
    ADD COLUMN cut_over_at timestamptz;

CREATE TABLE nightpass.fleet_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    by     text NOT NULL,
    event  text NOT NULL,
    detail jsonb
);
CREATE INDEX fleet_log_at ON nightpass.fleet_log (at);
"#;

/// Version 3: a filer's failed nights, so that a group cutover that fails
/// is retried under the retry policy (`retry_after` doubled at each
/// failure, at most `max_attempts`, then it waits for `fleet resume`),
/// never in a loop.
pub const MIGRATION_3: &str = r#"
ALTER TABLE nightpass.filers
    ADD COLUMN night_failures integer NOT NULL DEFAULT 0 CHECK (night_failures >= 0),
    ADD COLUMN night_retry_at timestamptz;
"#;

/// What [`init`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The schema's version before.
    pub from: i32,
    /// The schema's version now.
    pub to: i32,
}

/// Creates or upgrades the schema to [`latest`]; nothing when it is
/// there already. A schema newer than this binary is refused (exit 2).
pub async fn init(pool: &Pool) -> Result<Migrated> {
    let mut conn = pool.get().await?;
    let target = pool.target().to_string();
    let work = async {
        let tx = conn.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INIT_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS nightpass;
             CREATE TABLE IF NOT EXISTS nightpass.schema_version (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 applied_by text NOT NULL
             );",
        )
        .await?;
        let row = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM nightpass.schema_version",
                &[],
            )
            .await?;
        let from: i32 = row.get(0);
        if from > latest() {
            return Ok::<_, tokio_postgres::Error>((from, tx));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            tx.batch_execute(sql).await?;
            let by = format!("nightpass {}", env!("CARGO_PKG_VERSION"));
            tx.execute(
                "INSERT INTO nightpass.schema_version (version, applied_by) VALUES ($1, $2)",
                &[&(i as i32 + 1), &by],
            )
            .await?;
        }
        Ok((from, tx))
    };
    let (from, tx) = pool.timed("migrating the schema", work).await?;
    if from > latest() {
        drop(tx);
        return Err(newer(&target, from));
    }
    pool.timed("committing the migration", tx.commit()).await?;
    Ok(Migrated { from, to: latest() })
}

/// The refusal of a schema newer than this binary.
fn newer(target: &str, found: i32) -> Error {
    Error::input(format!(
        "database {target}: its nightpass schema is version {found}, newer than this \
         nightpass knows ({}): upgrade nightpass on this host",
        latest()
    ))
}

/// Checks that the database holds exactly the schema this binary knows;
/// refuses (exit 2) a missing, older or newer one, saying what to do.
pub async fn check(pool: &Pool) -> Result<()> {
    let conn = pool.get().await?;
    let target = pool.target();
    let q = conn.query_one(
        "SELECT coalesce(max(version), 0) FROM nightpass.schema_version",
        &[],
    );
    let found: i32 = match tokio::time::timeout(pool.settings().query_timeout, q).await {
        Ok(Ok(row)) => row.get(0),
        // 42P01: no such table, 3F000: no such schema.
        Ok(Err(e)) if matches!(sqlstate(&e), Some("42P01" | "3F000")) => 0,
        Ok(Err(e)) => {
            return Err(super::db::db_error(
                target,
                "reading the schema version",
                &e,
            ))
        }
        Err(_) => {
            return Err(Error::Network(format!(
                "database {target}: reading the schema version: no answer"
            )))
        }
    };
    match found {
        v if v == latest() => Ok(()),
        0 => Err(Error::input(format!(
            "database {target} has no nightpass schema: run `nightpass fleet init` first"
        ))),
        v if v < latest() => Err(Error::input(format!(
            "database {target}: its nightpass schema is version {v}, older than this \
             nightpass ({}): run `nightpass fleet init` to upgrade it",
            latest()
        ))),
        v => Err(newer(target, v)),
    }
}
