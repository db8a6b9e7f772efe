//! Shared test harness: identities, receivers, sender runs, images, loop
//! devices, mounts. Everything is a real process or a real device.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nightpass::net::transport::{self, Identity, Tuning};
use nightpass_proto::wire::{self, control::Msg, Mode};
use serde_json::Value;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nightpass")
}

/// A scratch directory removed at the end of the test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("np-night-")
        .tempdir()
        .expect("tempdir")
}

/// A test that cannot run here: a loud SKIP line by hand, a failure under
/// `CI=true` (CI must run every test, never skip one quietly).
pub fn skip(test: &str, why: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} cannot run: {why} (CI=true: a skipped test is a failure)");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

/// True when running as root with the given tools on the PATH; otherwise
/// prints a loud SKIP line naming `test` and what is missing (and fails
/// under `CI=true`).
pub fn need_root(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(test, "needs root (loop devices, mount, fsfreeze)");
    }
    for t in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return skip(test, &format!("needs '{t}', which is not installed"));
        }
    }
    true
}

/// An identity directory and its fingerprint.
pub struct Ident {
    pub dir: PathBuf,
    pub fp: String,
}

/// Creates an identity under `root/name`.
pub fn keygen(root: &Path, name: &str) -> Ident {
    let dir = root.join(name);
    let out = Command::new(bin())
        .args(["keygen", "--identity"])
        .arg(&dir)
        .output()
        .expect("run keygen");
    assert!(
        out.status.success(),
        "keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(fp.starts_with("np1-"), "fingerprint {fp}");
    Ident { dir, fp }
}

/// A running `nightpass serve`; killed on drop.
pub struct Receiver {
    pub child: Child,
    pub port: u16,
    pub fp: String,
    pub stderr: Arc<Mutex<String>>,
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
    /// `serve` flags, such as `--max-sessions-per-sender 2`) after the others;
    /// a restart keeps them.
    pub fn start_with(
        id: &Ident,
        state: &Path,
        volumes: &[(&str, &Path)],
        allow: &[&str],
        port: u16,
        extra_args: &[&str],
    ) -> Receiver {
        let mut cmd = Command::new(bin());
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--identity",
        ])
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("receiver did not start: {}", log.lock().unwrap()));
        // listening on 127.0.0.1:PORT fingerprint FP
        let words: Vec<&str> = line.split_whitespace().collect();
        let port = words[2].rsplit(':').next().unwrap().parse().unwrap();
        Receiver {
            child,
            port,
            fp: words[4].to_string(),
            stderr: log,
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
        let vols: Vec<(String, PathBuf)> = self.volumes.clone();
        let v: Vec<(&str, &Path)> = vols
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path()))
            .collect();
        let a: Vec<&str> = self.allow.iter().map(|s| s.as_str()).collect();
        let extra: Vec<String> = self.extra_args.clone();
        let e: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        let state = self.state.clone();
        let mut fresh = Receiver::start_with(&id, &state, &v, &a, self.port, &e);
        std::mem::swap(self, &mut fresh);
    }

    /// Everything the receiver wrote to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
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

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// The outcome of a nightpass command run with `--json`.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub events: Vec<Value>,
    pub stderr: String,
}

impl Run {
    /// The first event named `name`.
    pub fn event(&self, name: &str) -> &Value {
        self.events
            .iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} event in {:?}\nstderr: {}",
                    self.events, self.stderr
                )
            })
    }

    /// Every event named `name`.
    pub fn all(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }
}

/// Sender-side settings of a test.
pub struct SenderSide {
    pub id: Ident,
    pub state: PathBuf,
}

impl SenderSide {
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
        let mut c = Command::new(bin());
        c.arg(cmd)
            .arg(source)
            .arg(dest)
            .args(["--server-fingerprint", server_fp, "--json", "--identity"])
            .arg(&self.id.dir)
            .arg("--state-dir")
            .arg(&self.state)
            .args(extra);
        c
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

/// Runs a command to completion, parsing its stdout as JSON lines.
pub fn run_command(mut c: Command) -> Run {
    let out = c.output().expect("run nightpass");
    parse_run(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr)
}

/// Parses JSON-lines output; every stdout line must be a JSON object with "event".
pub fn parse_run(code: i32, stdout: &[u8], stderr: &[u8]) -> Run {
    let text = String::from_utf8_lossy(stdout);
    let events = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"));
            assert!(v.get("event").is_some(), "JSON line without event: {l}");
            v
        })
        .collect();
    Run {
        code,
        events,
        stderr: String::from_utf8_lossy(stderr).into_owned(),
    }
}

/// A deterministic pseudo-random generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes a file of `size` pseudo-random bytes.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// Writes `bytes` at `offset` of a file or device and syncs it.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

/// BLAKE3 of the first `len` bytes of a file or device.
pub fn hash_prefix(path: &Path, len: u64) -> blake3::Hash {
    let mut f = File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize()
}

/// BLAKE3 of a whole regular file.
pub fn hash_file(path: &Path) -> blake3::Hash {
    hash_prefix(path, std::fs::metadata(path).unwrap().len())
}

/// Size of a file or block device.
pub fn size_of(path: &Path) -> u64 {
    let out = Command::new("blockdev")
        .arg("--getsize64")
        .arg(path)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().parse().unwrap(),
        _ => std::fs::metadata(path).unwrap().len(),
    }
}

/// A loop device over a backing file; detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..20 {
            if Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A mounted filesystem; thawed (best effort) and unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    #[allow(clippy::self_named_constructors)]
    pub fn mount(dev: &Path, dir: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-o", opts])
            .arg(dev)
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount {} failed", dev.display());
        Mount {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Makes an ext4 filesystem on `dev`.
pub fn mkfs_ext4(dev: &Path) {
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(dev)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits until `f` is true or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Checks a receiver manifest against a fresh read of its target: every
/// entry that claims a hash must match the bytes. Returns (claimed, checked-bad).
pub fn manifest_claims_hold(manifest: &Path, target: &Path) -> (u64, Vec<u64>) {
    let m = std::fs::read(manifest).unwrap();
    let size = u64::from_le_bytes(m[16..24].try_into().unwrap());
    let chunk = u64::from(u32::from_le_bytes(m[24..28].try_into().unwrap()));
    let table = &m[4096..];
    let t = File::open(target).unwrap();
    let mut claimed = 0;
    let mut bad = Vec::new();
    let mut buf = vec![0u8; chunk as usize];
    for (i, e) in table.chunks_exact(32).enumerate() {
        if e.iter().all(|&b| b == 0) {
            continue;
        }
        claimed += 1;
        let off = i as u64 * chunk;
        let len = (size - off).min(chunk) as usize;
        t.read_exact_at(&mut buf[..len], off).unwrap();
        if blake3::hash(&buf[..len]).as_bytes() != e {
            bad.push(i as u64);
        }
    }
    (claimed, bad)
}

/// The receiver's manifest of volume `name` under its state dir.
pub fn receiver_manifest(state: &Path, name: &str) -> PathBuf {
    state.join("volumes").join(name).join("manifest")
}

/// A multi-threaded tokio runtime (two workers) for a test that drives a
/// peer by hand.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A Hello as a sender sends it first: protocol version, `volume`, `mode`,
/// the source's size and the chunk size; the rest as the caller sets it
/// (`..hello_for(...)`).
pub fn hello_for(volume: &str, mode: Mode, source_size: u64, chunk_size: u32) -> wire::Hello {
    wire::Hello {
        version: wire::PROTOCOL_VERSION,
        volume: volume.into(),
        mode: mode as i32,
        source_size,
        chunk_size,
        ..Default::default()
    }
}

/// A peer holding an authorized identity, driven by hand (hostile, stuck or
/// just precise): its endpoint, its connection to the receiver and the
/// control stream it opened.
pub struct AuthorizedPeer {
    pub ep: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl AuthorizedPeer {
    /// Connects with `identity` to the receiver on 127.0.0.1:`port` whose
    /// fingerprint is `server_fp`, and opens the control stream; the error
    /// in words when either fails.
    pub async fn try_connect(
        identity: &Identity,
        port: u16,
        server_fp: &str,
        tuning: &Tuning,
    ) -> Result<AuthorizedPeer, String> {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let (ep, conn) = transport::connect(identity, addr, server_fp, tuning)
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(AuthorizedPeer {
            ep,
            conn,
            send,
            recv,
        })
    }

    /// [`AuthorizedPeer::try_connect`], which must succeed.
    pub async fn connect(
        identity: &Identity,
        port: u16,
        server_fp: &str,
        tuning: &Tuning,
    ) -> AuthorizedPeer {
        AuthorizedPeer::try_connect(identity, port, server_fp, tuning)
            .await
            .unwrap_or_else(|e| panic!("an authorized peer could not connect: {e}"))
    }

    /// Sends `hello` on the control stream.
    pub async fn hello(&mut self, hello: wire::Hello) -> nightpass::error::Result<()> {
        transport::send_control(&mut self.send, Msg::Hello(hello)).await
    }

    /// The receiver's next control message (`None`: the stream ended).
    pub async fn answer(&mut self) -> nightpass::error::Result<Option<Msg>> {
        transport::recv_control(&mut self.recv).await
    }

    /// The receiver's next control message within `limit`; `None` when it
    /// did not come in time, the stream ended or failed.
    pub async fn answer_within(&mut self, limit: Duration) -> Option<Msg> {
        tokio::time::timeout(limit, self.answer())
            .await
            .ok()
            .and_then(|m| m.ok())
            .flatten()
    }

    /// Reads the answer to the Hello, which must be a Welcome.
    pub async fn expect_welcome(&mut self) -> wire::Welcome {
        match self.answer().await {
            Ok(Some(Msg::Welcome(w))) => w,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// Reads the answer to the Hello, which must be a Refusal.
    pub async fn expect_refusal(&mut self) -> wire::Refusal {
        match self.answer().await {
            Ok(Some(Msg::Refusal(r))) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Closes the connection and waits (up to 2 s) until the receiver knows,
    /// so it does not hold the volume for this session until its idle
    /// timeout.
    pub async fn close(self) {
        self.ep.close(0u32.into(), b"");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ep.wait_idle()).await;
    }
}
