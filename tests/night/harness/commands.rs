//! A sender's commands: `nightpass sync|converge|cutover|...` with the
//! test's identity and state, run to completion (a [`Run`]) or in the
//! background ([`Spawned`]), killed and failed when they overstay.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::processes::{drain, Sink};
use super::{bin, keygen, parse_run, wait_for, Ident, Receiver, Run, COMMAND_TIMEOUT};

/// Sender-side settings of a test: an identity and a state directory.
pub struct SenderSide {
    pub id: Ident,
    pub state: PathBuf,
}

impl SenderSide {
    /// Identity `<name>-id` and state `<name>-state` under `root`.
    pub fn new(root: &Path, name: &str) -> SenderSide {
        SenderSide {
            id: keygen(root, &format!("{name}-id")),
            state: root.join(format!("{name}-state")),
        }
    }

    /// The command line of `nightpass CMD SOURCE DEST` with this sender's identity and state.
    pub fn command(
        &self,
        cmd: &str,
        source: &Path,
        dest: &str,
        server_fp: &str,
        extra: &[&str],
    ) -> Command {
        sender_command(
            cmd,
            source,
            dest,
            server_fp,
            &self.id.dir,
            &self.state,
            extra,
        )
    }

    /// Runs `nightpass sync SOURCE` to volume `name` of `rx` (no other flags)
    /// and asserts it succeeded (exit 0); `what` names the pass when not.
    pub fn sync_ok(&self, source: &Path, rx: &Receiver, name: &str, what: &str) -> Run {
        let r = self.run("sync", source, &rx.dest(name), &rx.fp, &[]);
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        r
    }

    /// Runs `nightpass CMD SOURCE DEST ...` to completion.
    pub fn run(
        &self,
        cmd: &str,
        source: &Path,
        dest: &str,
        server_fp: &str,
        extra: &[&str],
    ) -> Run {
        run_command(self.command(cmd, source, dest, server_fp, extra))
    }
}

/// `nightpass CMD SOURCE DEST --server-fingerprint FP --json --identity ID
/// --state-dir STATE EXTRA...`.
fn sender_command(
    cmd: &str,
    source: &Path,
    dest: &str,
    server_fp: &str,
    identity: &Path,
    state: &Path,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(bin());
    c.arg(cmd)
        .arg(source)
        .arg(dest)
        .args(["--server-fingerprint", server_fp, "--json", "--identity"])
        .arg(identity)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .stdin(Stdio::null());
    c
}

/// Runs a command to completion (killed and failed after
/// [`COMMAND_TIMEOUT`]), parsing its stdout as JSON lines.
pub fn run_command(c: Command) -> Run {
    Spawned::start(c).finish(COMMAND_TIMEOUT)
}

/// A sender's identity, state and pinned receiver fingerprint, running
/// `nightpass sync`.
#[derive(Clone)]
pub struct Sender {
    /// Identity directory.
    pub identity: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// `--server-fingerprint`.
    pub server_fp: String,
}

impl Sender {
    /// Runs `nightpass sync SOURCE DEST ... --json EXTRA` to completion.
    pub fn sync(&self, source: &Path, dest: &str, extra: &[&str]) -> Run {
        self.spawn_sync(source, dest, extra).finish(COMMAND_TIMEOUT)
    }

    /// Starts a sync in the background.
    pub fn spawn_sync(&self, source: &Path, dest: &str, extra: &[&str]) -> Spawned {
        let (id, state) = (&self.identity, &self.state_dir);
        Spawned::start(sender_command(
            "sync",
            source,
            dest,
            &self.server_fp,
            id,
            state,
            extra,
        ))
    }
}

/// A command running in the background, its stdout and stderr collected;
/// killed on drop unless finished.
pub struct Spawned {
    pub child: Child,
    desc: String,
    out: Sink,
    err: Sink,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Spawned {
    /// Starts `c` with stdout and stderr piped.
    pub fn start(mut c: Command) -> Spawned {
        let desc = format!("{c:?}");
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        let (out, err): (Sink, Sink) = Default::default();
        let readers = vec![
            drain(child.stdout.take().unwrap(), out.clone()),
            drain(child.stderr.take().unwrap(), err.clone()),
        ];
        Spawned {
            child,
            desc,
            out,
            err,
            readers,
            started: Instant::now(),
        }
    }

    /// How long since it started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// True when a JSON line with `"event":"<event>"` appeared on stdout.
    pub fn saw(&self, event: &str) -> bool {
        self.stdout().contains(&format!("\"event\":\"{event}\""))
    }

    /// Waits (at most `limit`) until [`Spawned::saw`] `event`.
    pub fn wait_event(&self, event: &str, limit: Duration) -> bool {
        wait_for(limit, || self.saw(event))
    }

    /// Waits for a JSON event on stdout; panics after `limit`.
    pub fn expect_event(&self, event: &str, limit: Duration) {
        assert!(
            self.wait_event(event, limit),
            "no {event} within {limit:?}; stderr: {}",
            self.stderr()
        );
    }

    /// The first stdout line that parses as a JSON object with `"event":
    /// event`, waiting for it at most `limit` (a failure after).
    pub fn wait_for_event(&self, event: &str, limit: Duration) -> Value {
        let find = || {
            self.stdout()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["event"] == event)
        };
        let mut found = None;
        wait_for(limit, || {
            found = find();
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no {event:?} event from {} within {limit:?}; stdout:\n{}\nstderr:\n{}",
                self.desc,
                self.stdout(),
                self.stderr()
            )
        })
    }

    /// True once the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Sends signal `sig`.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// SIGKILL, as a crash.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit (at most `limit`, else kills it and fails) and
    /// parses the output; a process killed by a signal has code -1.
    pub fn finish(mut self, limit: Duration) -> Run {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {limit:?}; stdout:\n{}\nstderr:\n{}",
                    self.desc,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = std::mem::take(&mut *self.out.lock().unwrap());
        let err = std::mem::take(&mut *self.err.lock().unwrap());
        let mut run = parse_run(status.code().unwrap_or(-1), &out, &err);
        run.desc = std::mem::take(&mut self.desc);
        run
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
