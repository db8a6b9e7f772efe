//! Processes: identities (`keygen`), a receiver (`serve`) killed on drop,
//! and the per-test worlds built of them with a sender ([`Setup`],
//! [`pair`]). The sender's commands are [`super::commands`]'s.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{bin, random_file, scratch, Sender, SenderSide};

/// Longest a receiver may take to print its `listening on` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// An identity directory and its fingerprint.
pub struct Ident {
    pub dir: PathBuf,
    pub fp: String,
}

/// `nightpass keygen --identity DIR`: asserts exactly one `np1-` token on
/// stdout and returns it.
pub fn keygen_at(dir: &Path) -> String {
    let out = Command::new(bin())
        .args(["keygen", "--identity"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("spawn nightpass keygen");
    assert!(
        out.status.success(),
        "keygen --identity {} failed ({}): {}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("keygen stdout is UTF-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "keygen must print exactly one line, got {stdout:?}"
    );
    let fp = lines[0].trim().to_string();
    assert!(
        fp.starts_with("np1-") && !fp.contains(char::is_whitespace),
        "fingerprint {fp:?} is not one np1- token"
    );
    fp
}

/// Creates an identity under `root/name`.
pub fn keygen(root: &Path, name: &str) -> Ident {
    let dir = root.join(name);
    let fp = keygen_at(&dir);
    Ident { dir, fp }
}

/// Bytes a child wrote to one of its pipes, collected by [`drain`].
pub(super) type Sink = Arc<Mutex<Vec<u8>>>;

/// Collects everything read from `pipe` into `sink`, in a thread.
pub(super) fn drain(mut pipe: impl Read + Send + 'static, sink: Sink) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// A running `nightpass serve`; killed (and reaped) on drop, its log
/// printed when the test is failing.
pub struct Receiver {
    pub child: Child,
    pub port: u16,
    pub fp: String,
    stderr: Sink,
    pub id: PathBuf,
    pub state: PathBuf,
    pub volumes: Vec<(String, PathBuf)>,
    pub allow: Vec<String>,
    /// The `serve` flags given to [`Receiver::start_with`] beyond the usual ones.
    pub extra_args: Vec<String>,
}

impl Receiver {
    /// Starts a receiver on an ephemeral port (or `port` when non-zero).
    pub fn start(
        id: &Ident,
        state: &Path,
        volumes: &[(&str, &Path)],
        allow: &[&str],
        port: u16,
    ) -> Receiver {
        Receiver::start_with(id, state, volumes, allow, port, &[])
    }

    /// Starts a receiver like [`Receiver::start`], with `extra_args` (more
    /// `serve` flags, such as `--max-sessions-per-sender 2`, or a
    /// `--listen` of its own instead of 127.0.0.1) after the others; a
    /// restart keeps them.
    pub fn start_with(
        id: &Ident,
        state: &Path,
        volumes: &[(&str, &Path)],
        allow: &[&str],
        port: u16,
        extra_args: &[&str],
    ) -> Receiver {
        let mut cmd = Command::new(bin());
        cmd.arg("serve");
        // `extra_args` may name the address itself (`--listen localhost:0`).
        if !extra_args.contains(&"--listen") {
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        cmd.arg("--identity")
            .arg(&id.dir)
            .arg("--state-dir")
            .arg(state);
        for (n, p) in volumes {
            cmd.arg("--volume").arg(format!("{n}={}", p.display()));
        }
        for a in allow {
            cmd.args(["--allow", a]);
        }
        cmd.args(extra_args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nightpass serve");
        let stderr: Sink = Arc::default();
        drain(child.stderr.take().unwrap(), stderr.clone());
        let (port, fp) = wait_listening(&mut child, &stderr);
        Receiver {
            child,
            port,
            fp,
            stderr,
            id: id.dir.clone(),
            state: state.to_owned(),
            volumes: volumes
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_path_buf()))
                .collect(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `127.0.0.1:PORT/NAME`.
    pub fn dest(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }

    /// Kills the receiver with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same receiver again on the same port.
    pub fn restart(&mut self) {
        self.kill9();
        let id = Ident {
            dir: self.id.clone(),
            fp: self.fp.clone(),
        };
        let v: Vec<(&str, &Path)> = self
            .volumes
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path()))
            .collect();
        let a: Vec<&str> = self.allow.iter().map(|s| s.as_str()).collect();
        let e: Vec<&str> = self.extra_args.iter().map(|s| s.as_str()).collect();
        let mut fresh = Receiver::start_with(&id, &self.state, &v, &a, self.port, &e);
        std::mem::swap(self, &mut fresh);
    }

    /// Everything the receiver wrote to stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Asserts that the receiver's log says `words` within `limit`.
    pub fn assert_log_says_within(&self, words: &str, limit: Duration) {
        assert!(
            super::wait_for(limit, || self.log().contains(words)),
            "the receiver's log does not say {words:?} within {limit:?}:\n{}",
            self.log()
        );
    }

    /// Asserts that the receiver's log says `words` by now; `why` is what
    /// it means when it does not (e.g. "the receiver did not say why it
    /// ended the session").
    pub fn assert_log_says(&self, words: &str, why: &str) {
        let log = self.log();
        assert!(
            log.contains(words),
            "{why} (its log does not say {words:?}):\n{log}"
        );
    }
}

/// Waits for `serve`'s `listening on 127.0.0.1:PORT fingerprint FP` line
/// (after the line's time and level) and returns the port and fingerprint; fails the test when it exits or
/// stays silent for [`LISTEN_TIMEOUT`].
fn wait_listening(child: &mut Child, stderr: &Mutex<Vec<u8>>) -> (u16, String) {
    let log = || String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    let line = loop {
        let text = log();
        // Complete lines only: the last may still be arriving.
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        let found = complete
            .lines()
            .find_map(|l| l.find("listening on ").map(|at| l[at..].to_string()));
        if let Some(line) = found {
            break line;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "nightpass serve exited ({status}) before listening; stderr:\n{}",
                log()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "nightpass serve printed no `listening on` line within {LISTEN_TIMEOUT:?}; stderr:\n{}",
                log()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(
        words.len() == 5 && words[3] == "fingerprint",
        "unexpected listening line {line:?}"
    );
    let addr: std::net::SocketAddr = words[2]
        .parse()
        .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "{line:?}");
    assert_ne!(addr.port(), 0, "{line:?}");
    (addr.port(), words[4].to_string())
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "receiver on port {} wrote to stderr:\n{}",
                self.port,
                self.log()
            );
        }
    }
}

/// One test's world: a temp root with a sender identity, a receiver identity,
/// separate state directories for each side, and a data directory.
pub struct Setup {
    /// Keeps everything alive; removed on drop.
    pub root: tempfile::TempDir,
    /// Sender identity directory.
    pub sender_id: PathBuf,
    /// Sender fingerprint.
    pub sender_fp: String,
    /// Receiver identity directory.
    pub receiver_id: PathBuf,
    /// Receiver fingerprint.
    pub receiver_fp: String,
    /// Sender state directory.
    pub sender_state: PathBuf,
    /// Receiver state directory.
    pub receiver_state: PathBuf,
    /// Where sources and targets live.
    pub data: PathBuf,
}

impl Setup {
    /// Creates the directories and both identities.
    pub fn new() -> Setup {
        let root = scratch();
        let p = root.path().to_path_buf();
        let (sender_state, receiver_state, data) = (
            p.join("sender-state"),
            p.join("receiver-state"),
            p.join("data"),
        );
        for d in [&sender_state, &receiver_state, &data] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let sender = keygen(&p, "sender-identity");
        let receiver = keygen(&p, "receiver-identity");
        assert_ne!(
            sender.fp, receiver.fp,
            "two keygens gave the same fingerprint"
        );
        Setup {
            root,
            sender_id: sender.dir,
            sender_fp: sender.fp,
            receiver_id: receiver.dir,
            receiver_fp: receiver.fp,
            sender_state,
            receiver_state,
            data,
        }
    }

    /// A path in the data directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.data.join(name)
    }

    /// A fresh, empty directory under the temp root.
    pub fn new_dir(&self, name: &str) -> PathBuf {
        let d = self.root.path().join(name);
        fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// The receiver's identity.
    pub fn receiver_ident(&self) -> Ident {
        Ident {
            dir: self.receiver_id.clone(),
            fp: self.receiver_fp.clone(),
        }
    }

    /// Starts a receiver with this setup's receiver identity and state,
    /// exporting `volumes` and allowing only this setup's sender.
    pub fn start_receiver(&self, volumes: &[(&str, &Path)]) -> Receiver {
        let id = self.receiver_ident();
        let r = Receiver::start(&id, &self.receiver_state, volumes, &[&self.sender_fp], 0);
        assert_eq!(
            r.fp, self.receiver_fp,
            "serve announced a fingerprint other than `keygen` printed"
        );
        r
    }

    /// A sender with this setup's identity and state, pinned to `receiver`.
    pub fn sender(&self, receiver: &Receiver) -> Sender {
        Sender {
            identity: self.sender_id.clone(),
            state_dir: self.sender_state.clone(),
            server_fp: receiver.fp.clone(),
        }
    }
}

/// A sender identity `s` under `root` and a receiver (identity `r-id`,
/// state `r-state`) exporting `volumes` to it alone.
pub fn pair(root: &Path, volumes: &[(&str, &Path)]) -> (SenderSide, Receiver) {
    let sender = SenderSide::new(root, "s");
    let rid = keygen(root, "r-id");
    let rx = Receiver::start(&rid, &root.join("r-state"), volumes, &[&sender.id.fp], 0);
    (sender, rx)
}

/// A scratch tree holding a source of `size` pseudo-random bytes (from
/// `seed`) named `source`, and a sender and receiver ([`pair`]) exporting
/// `target` there as volume `v`. Returns (scratch, source, target, sender,
/// receiver).
pub fn source_and_volume(
    source: &str,
    target: &str,
    size: u64,
    seed: u64,
) -> (tempfile::TempDir, PathBuf, PathBuf, SenderSide, Receiver) {
    let root = scratch();
    let (src, dst) = (root.path().join(source), root.path().join(target));
    random_file(&src, size, seed);
    let (sender, rx) = pair(root.path(), &[("v", &dst)]);
    (root, src, dst, sender, rx)
}
