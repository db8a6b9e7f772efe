//! Shared helpers: identities, a receiver process guard, running `sync` with
//! `--json`, deterministic random data and byte-level comparison.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver as Channel};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The default chunk size of the contract.
pub const CHUNK: u64 = 64 * 1024;
/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// Longest any one nightpass command may run before the test kills it and fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(240);
/// Longest a receiver may take to print its `listening on` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nightpass")
}

/// `nightpass keygen --identity DIR`: asserts one `np1-` line on stdout and returns it.
pub fn keygen(dir: &Path) -> String {
    let out = Command::new(bin())
        .arg("keygen")
        .arg("--identity")
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

/// One test's world: a temp root with a sender identity, a receiver identity,
/// separate state directories for each side, and a data directory.
pub struct Setup {
    /// Keeps everything alive; removed on drop.
    pub root: TempDir,
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
        let root = tempfile::Builder::new()
            .prefix("nightpass-it-")
            .tempdir()
            .expect("temp dir");
        let p = root.path().to_path_buf();
        let sender_id = p.join("sender-identity");
        let receiver_id = p.join("receiver-identity");
        let sender_state = p.join("sender-state");
        let receiver_state = p.join("receiver-state");
        let data = p.join("data");
        for d in [&sender_state, &receiver_state, &data] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let sender_fp = keygen(&sender_id);
        let receiver_fp = keygen(&receiver_id);
        assert_ne!(
            sender_fp, receiver_fp,
            "two keygens gave the same fingerprint"
        );
        Setup {
            root,
            sender_id,
            sender_fp,
            receiver_id,
            receiver_fp,
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

    /// Starts a receiver with this setup's receiver identity and state,
    /// exporting `volumes` and allowing only this setup's sender.
    pub fn start_receiver(&self, volumes: &[(&str, &Path)]) -> Receiver {
        let r = Receiver::start(
            volumes,
            &[self.sender_fp.as_str()],
            &self.receiver_id,
            &self.receiver_state,
        );
        assert_eq!(
            r.fingerprint, self.receiver_fp,
            "serve announced a fingerprint other than `keygen` printed"
        );
        r
    }

    /// A sender with this setup's identity and state, pinned to `receiver`.
    pub fn sender(&self, receiver: &Receiver) -> Sender {
        Sender {
            identity: self.sender_id.clone(),
            state_dir: self.sender_state.clone(),
            server_fp: receiver.fingerprint.clone(),
        }
    }
}

/// Reads a child's stream line by line into a shared buffer (so the pipe never
/// fills), forwarding each line to an optional channel.
fn drain_lines<R: Read + Send + 'static>(
    stream: R,
    buf: Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    buf.lock().unwrap().push_str(&line);
                    if let Some(tx) = &lines {
                        let _ = tx.send(line.trim_end_matches('\n').to_string());
                    }
                }
            }
        }
    })
}

/// A running `nightpass serve`; killed (and reaped) on drop.
pub struct Receiver {
    child: Child,
    /// The UDP port it bound.
    pub port: u16,
    /// The fingerprint it announced.
    pub fingerprint: String,
    stderr: Arc<Mutex<String>>,
}

impl Receiver {
    /// Starts `nightpass serve --listen 127.0.0.1:0` and waits for its
    /// `listening on 127.0.0.1:PORT fingerprint FP` line.
    pub fn start(
        volumes: &[(&str, &Path)],
        allow: &[&str],
        identity: &Path,
        state_dir: &Path,
    ) -> Receiver {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        for (name, path) in volumes {
            cmd.arg("--volume")
                .arg(format!("{name}={}", path.display()));
        }
        for fp in allow {
            cmd.arg("--allow").arg(fp);
        }
        cmd.arg("--identity")
            .arg(identity)
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn nightpass serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        drain_lines(child.stderr.take().unwrap(), stderr.clone(), Some(tx));
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let listening = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) if line.starts_with("listening on ") => break line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "nightpass serve exited ({status}) before listening; stderr:\n{}",
                            stderr.lock().unwrap()
                        );
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "nightpass serve printed no `listening on` line within {LISTEN_TIMEOUT:?}; stderr:\n{}",
                        stderr.lock().unwrap()
                    );
                }
            }
        };
        // `listening on 127.0.0.1:PORT fingerprint FP`
        let words: Vec<&str> = listening.split_whitespace().collect();
        assert!(
            words.len() == 5 && words[3] == "fingerprint",
            "unexpected listening line {listening:?}"
        );
        let addr: std::net::SocketAddr = words[2]
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {listening:?}: {e}"));
        assert_eq!(addr.ip().to_string(), "127.0.0.1", "{listening:?}");
        assert_ne!(addr.port(), 0, "{listening:?}");
        Receiver {
            child,
            port: addr.port(),
            fingerprint: words[4].to_string(),
            stderr,
        }
    }

    /// `127.0.0.1:PORT/NAME`.
    pub fn dest(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "receiver on port {} wrote to stderr:\n{}",
                self.port,
                self.stderr.lock().unwrap()
            );
        }
    }
}

/// A sender's identity, state and pinned receiver fingerprint.
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
    fn command(&self, source: &Path, dest: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("sync")
            .arg(source)
            .arg(dest)
            .arg("--server-fingerprint")
            .arg(&self.server_fp)
            .arg("--identity")
            .arg(&self.identity)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--json")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `nightpass sync SOURCE DEST ... --json EXTRA` to completion.
    pub fn sync(&self, source: &Path, dest: &str, extra: &[&str]) -> SyncRun {
        self.spawn_sync(source, dest, extra).finish()
    }

    /// Starts a sync; its stdout lines can be watched while it runs.
    pub fn spawn_sync(&self, source: &Path, dest: &str, extra: &[&str]) -> RunningSync {
        let mut cmd = self.command(source, dest, extra);
        let desc = format!("{cmd:?}");
        let mut child = cmd.spawn().expect("spawn nightpass sync");
        let stdout_buf = Arc::new(Mutex::new(String::new()));
        let stderr_buf = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let out: ChildStdout = child.stdout.take().unwrap();
        let t_out = drain_lines(out, stdout_buf.clone(), Some(tx));
        let t_err = drain_lines(child.stderr.take().unwrap(), stderr_buf.clone(), None);
        RunningSync {
            child: Some(child),
            desc,
            lines: rx,
            stdout: stdout_buf,
            stderr: stderr_buf,
            threads: vec![t_out, t_err],
        }
    }
}

/// A sync process still running; killed on drop unless finished.
pub struct RunningSync {
    child: Option<Child>,
    desc: String,
    lines: Channel<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    threads: Vec<JoinHandle<()>>,
}

impl RunningSync {
    /// Waits until a stdout line parses as a JSON object with `"event": event`.
    pub fn wait_for_event(&mut self, event: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["event"] == event {
                            return v;
                        }
                    }
                }
                Err(_) => panic!(
                    "no {event:?} event from {} within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                    self.desc,
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// Waits for the process (killing it after [`COMMAND_TIMEOUT`]) and parses its output.
    pub fn finish(mut self) -> SyncRun {
        let mut child = self.child.take().expect("not finished yet");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for nightpass sync") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not finish within {COMMAND_TIMEOUT:?}; stdout:\n{}\nstderr:\n{}",
                    self.desc,
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        let code = status.code().unwrap_or_else(|| {
            panic!(
                "{} was killed by a signal ({status}); stderr:\n{stderr}",
                self.desc
            )
        });
        let mut events = Vec::new();
        for line in stdout.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "--json stdout carries a line that is not JSON ({e}): {line:?}\nstderr:\n{stderr}"
                )
            });
            assert!(
                v.get("event").is_some_and(Value::is_string),
                "JSON line without a string \"event\": {line}"
            );
            events.push(v);
        }
        SyncRun {
            desc: self.desc.clone(),
            code,
            events,
            stderr,
        }
    }
}

impl Drop for RunningSync {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A finished sync: exit status, JSON events, stderr.
pub struct SyncRun {
    /// The command line, for messages.
    pub desc: String,
    /// Exit status.
    pub code: i32,
    /// Parsed stdout lines.
    pub events: Vec<Value>,
    /// Stderr text.
    pub stderr: String,
}

impl SyncRun {
    fn context(&self) -> String {
        format!(
            "command: {}\nexit status: {}\nevents:\n{}\nstderr:\n{}",
            self.desc,
            self.code,
            self.events
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
            self.stderr
        )
    }

    /// Asserts exit status 0 and returns self.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "sync failed\n{}", self.context());
        assert!(
            !self.events.iter().any(|e| e["event"] == "error"),
            "exit 0 with an error event\n{}",
            self.context()
        );
        self
    }

    /// The only event named `name`.
    #[track_caller]
    pub fn event(&self, name: &str) -> &Value {
        let found: Vec<&Value> = self.events.iter().filter(|e| e["event"] == name).collect();
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {name:?} event\n{}",
            self.context()
        );
        found[0]
    }

    /// An unsigned integer field of the only `event`.
    #[track_caller]
    pub fn num(&self, event: &str, field: &str) -> u64 {
        let e = self.event(event);
        e[field].as_u64().unwrap_or_else(|| {
            panic!(
                "{event}.{field} is not an unsigned integer: {}\n{}",
                e[field],
                self.context()
            )
        })
    }

    /// `pass_end.changed_chunks`.
    #[track_caller]
    pub fn changed_chunks(&self) -> u64 {
        self.num("pass_end", "changed_chunks")
    }

    /// `pass_end.sent_bytes`.
    #[track_caller]
    pub fn sent_bytes(&self) -> u64 {
        self.num("pass_end", "sent_bytes")
    }

    /// Asserts the shape of a successful pass: pass_start and pass_end with
    /// the contract's fields, the given pass number, size and chunk size, and
    /// every byte scanned.
    #[track_caller]
    pub fn assert_pass(&self, pass: u64, size: u64, chunk: u64) -> &Self {
        self.ok();
        for ev in ["pass_start", "pass_end"] {
            assert_eq!(self.num(ev, "pass"), pass, "{ev}.pass\n{}", self.context());
            assert_eq!(
                self.num(ev, "size_bytes"),
                size,
                "{ev}.size_bytes\n{}",
                self.context()
            );
            assert_eq!(
                self.num(ev, "chunk_size"),
                chunk,
                "{ev}.chunk_size\n{}",
                self.context()
            );
            assert!(
                self.event(ev)["volume"].is_string(),
                "{ev}.volume\n{}",
                self.context()
            );
        }
        let start = self
            .events
            .iter()
            .position(|e| e["event"] == "pass_start")
            .unwrap();
        let end = self
            .events
            .iter()
            .position(|e| e["event"] == "pass_end")
            .unwrap();
        assert!(
            start < end,
            "pass_end before pass_start\n{}",
            self.context()
        );
        assert_eq!(
            self.num("pass_end", "scanned_bytes"),
            size,
            "pass_end.scanned_bytes\n{}",
            self.context()
        );
        let end_ev = self.event("pass_end");
        assert!(
            end_ev["duration_s"].as_f64().is_some_and(|d| d >= 0.0),
            "pass_end.duration_s\n{}",
            self.context()
        );
        let f = &end_ev["forecast_final_pass_s"];
        assert!(
            f.is_null() || f.is_number(),
            "pass_end.forecast_final_pass_s must be a number or null\n{}",
            self.context()
        );
        self
    }

    /// Asserts a refusal: exit status 2, `needle` in stderr (case-insensitive),
    /// an `error` event on stdout, and no pass_end.
    #[track_caller]
    pub fn assert_refused(&self, needle: &str) {
        assert_eq!(self.code, 2, "expected exit status 2\n{}", self.context());
        assert!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "stderr does not mention {needle:?}\n{}",
            self.context()
        );
        let err = self
            .events
            .iter()
            .find(|e| e["event"] == "error")
            .unwrap_or_else(|| panic!("no error event on stdout\n{}", self.context()));
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error event without a message\n{}",
            self.context()
        );
        assert!(
            !self.events.iter().any(|e| e["event"] == "pass_end"),
            "a refused sync reported a pass_end\n{}",
            self.context()
        );
    }
}

/// A small deterministic PRNG (xorshift64*), seeded per test.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// Writes `len` random bytes to `path` (created or truncated), in 1 MiB pieces.
pub fn write_random_file(path: &Path, len: u64, rng: &mut Rng) {
    let mut f = File::create(path).expect("create file");
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write file");
        left -= n as u64;
    }
    f.sync_all().expect("fsync file");
}

/// Writes `data` at `offset` of the file or device at `path`, then makes it durable.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", path.display()));
    f.sync_all().expect("fsync");
}

/// Flushes `path` and drops it from the page cache; returns the bytes of it
/// still cached afterwards as `fincore` counts them (`None` without fincore).
pub fn evict_from_cache(path: &Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.sync_all().expect("fsync");
    // SAFETY: fadvise on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise(DONTNEED) of {}", path.display());
    if !have_tool("fincore") {
        return None;
    }
    let out = run_tool(
        "fincore",
        &[
            "--bytes",
            "--noheadings",
            "--output",
            "RES",
            &path.to_string_lossy(),
        ],
    );
    Some(out.trim().parse().expect("fincore prints a number"))
}

/// Writes `count` random 4 KiB blocks at random 4 KiB-aligned offsets of the
/// first `size` bytes of `path` and returns the set of `chunk`-sized chunks
/// they touched.
pub fn scatter_writes(
    path: &Path,
    size: u64,
    count: usize,
    chunk: u64,
    rng: &mut Rng,
) -> BTreeSet<u64> {
    scatter_blocks(path, size, count, rng)
        .into_iter()
        .map(|offset| offset / chunk)
        .collect()
}

/// Writes `count` random 4 KiB blocks at random 4 KiB-aligned offsets of the
/// first `size` bytes of `path` and returns the offsets of the distinct
/// blocks written.
pub fn scatter_blocks(path: &Path, size: u64, count: usize, rng: &mut Rng) -> BTreeSet<u64> {
    const BLOCK: u64 = 4096;
    assert!(size >= BLOCK);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    let mut written = BTreeSet::new();
    let mut block = vec![0u8; BLOCK as usize];
    for _ in 0..count {
        let offset = rng.below(size / BLOCK) * BLOCK;
        rng.fill(&mut block);
        f.write_all_at(&block, offset).expect("scattered write");
        written.insert(offset);
    }
    f.sync_all().expect("fsync");
    written
}

/// BLAKE3 of the first `len` bytes of `path` (a file or a device).
pub fn hash_prefix(path: &Path, len: u64) -> blake3::Hash {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("read {} at {off}: {e}", path.display()));
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize()
}

/// BLAKE3 of the whole file at `path`.
pub fn file_hash(path: &Path) -> blake3::Hash {
    hash_prefix(path, file_len(path))
}

/// Length of a regular file.
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// Offset of the first `CHUNK` block where the first `len` bytes of `a` and `b` differ.
pub fn first_difference(a: &Path, b: &Path, len: u64) -> Option<u64> {
    let fa = File::open(a).expect("open a");
    let fb = File::open(b).expect("open b");
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK) as usize;
        fa.read_exact_at(&mut ba[..n], off).expect("read a");
        fb.read_exact_at(&mut bb[..n], off).expect("read b");
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            return Some(off + i as u64);
        }
        off += n as u64;
    }
    None
}

/// Asserts that `target` holds exactly the bytes of `source` in its first
/// `len` bytes (`len` = the source's size).
#[track_caller]
pub fn assert_same_prefix(source: &Path, target: &Path, len: u64) {
    if let Some(at) = first_difference(source, target, len) {
        panic!(
            "{} differs from {} at byte {at} (chunk {})",
            target.display(),
            source.display(),
            at / CHUNK
        );
    }
}

/// Asserts that the regular file `target` is byte-identical to `source`,
/// length included.
#[track_caller]
pub fn assert_same_file(source: &Path, target: &Path) {
    let len = file_len(source);
    assert_eq!(
        file_len(target),
        len,
        "{} has another length than {}",
        target.display(),
        source.display()
    );
    assert_same_prefix(source, target, len);
    assert_eq!(file_hash(source), file_hash(target));
}

/// Number of `chunk`-sized chunks of `path` (size `len`) that hold a non-zero byte.
pub fn nonzero_chunks(path: &Path, len: u64, chunk: u64) -> u64 {
    let f = File::open(path).expect("open");
    let mut buf = vec![0u8; chunk as usize];
    let mut count = 0;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk) as usize;
        f.read_exact_at(&mut buf[..n], off).expect("read");
        if buf[..n].iter().any(|&b| b != 0) {
            count += 1;
        }
        off += n as u64;
    }
    count
}

/// Number of chunks of a volume of `size` bytes.
pub fn chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk)
}

/// Whether `tool` is on the PATH.
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a system command, panicking with its output on failure; returns stdout.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
