//! Access and limits: peers, authorized or not, cannot keep honest senders
//! out or hold a volume forever; a sender killed mid-pass does not keep its
//! volume from the rerun; `serve` survives a hang-up and warns about an
//! exposed identity key.
//!
//! The hostile peers are built from the library's own transport and wire
//! modules (authorized ones) or from quinn and rustls directly (a client
//! that stalls inside the TLS handshake).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nightpass::net::transport::{self, Identity, Tuning};
use nightpass_proto::wire::{self, control::Msg, Mode};

use crate::harness::*;

/// Runs `sync` (with `--retry-for 0s`, so a refusal ends it) once a second
/// until it succeeds or `limit` passes; returns the last run and how many
/// were refused before.
fn sync_until_accepted(
    sender: &SenderSide,
    src: &Path,
    rx: &Receiver,
    limit: Duration,
) -> (Run, u32) {
    let t = Instant::now();
    let mut refused = 0;
    loop {
        let r = sender.run("sync", src, &rx.dest("v"), &rx.fp, &["--retry-for", "0s"]);
        if r.code == 0 || t.elapsed() > limit {
            return (r, refused);
        }
        refused += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------
// Item 9: unauthenticated peers cannot take the session slots.

/// A client-side certificate check that takes `stall` and then refuses: the
/// client never sends its own certificate and Finished, so the receiver
/// waits on a handshake that never completes.
#[derive(Debug)]
struct Stall {
    stall: Duration,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Stall {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        std::thread::sleep(self.stall);
        Err(rustls::Error::General("stalled on purpose".into()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not used".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client config (unauthorized certificate) whose handshakes stall.
fn stalling_client(stall: Duration) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ck = rcgen::generate_simple_self_signed(vec!["intruder".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Stall { stall, provider }))
        .with_client_auth_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// One stalling client, renewed as each attempt ends, until `stop`. Its own
/// thread and runtime: the stall blocks the thread it runs on.
fn staller(port: u16, stop: Arc<AtomicBool>, attempts: Arc<AtomicU64>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(stalling_client(Duration::from_secs(14)));
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        while !stop.load(Ordering::Relaxed) {
            attempts.fetch_add(1, Ordering::Relaxed);
            if let Ok(c) = ep.connect(addr, "nightpass") {
                let _ = tokio::time::timeout(Duration::from_secs(20), c).await;
            }
        }
    });
}

/// An unauthorized sender connecting over and over (each refused during
/// the handshake), until `stop`.
fn intruder(id_dir: &Path, port: u16, fp: &str, stop: Arc<AtomicBool>, attempts: Arc<AtomicU64>) {
    let id = Identity::load(id_dir).unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        while !stop.load(Ordering::Relaxed) {
            attempts.fetch_add(1, Ordering::Relaxed);
            if let Ok((ep, c)) = transport::connect(&id, addr, fp, &Tuning::default()).await {
                c.close(0u32.into(), b"");
                ep.wait_idle().await;
            }
        }
    });
}

/// Issue 13 item 9: 40 clients stalling inside the TLS handshake (and two
/// unauthorized senders retrying as fast as they can) against a receiver
/// with the default `--max-sessions`: an honest sync started after the
/// flood began still gets in, and the receiver's log stays bounded.
#[test]
fn stalled_handshakes_do_not_lock_out_an_honest_sender() {
    let (dir, src, dst, sender, rx) = source_and_volume("src.img", "dst.img", 8 * MIB, 91);
    let outsider = keygen(dir.path(), "outsider");
    let stop = Arc::new(AtomicBool::new(false));
    let stalls = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..40 {
        let (stop, n, port) = (stop.clone(), stalls.clone(), rx.port);
        threads.push(std::thread::spawn(move || staller(port, stop, n)));
    }
    for _ in 0..2 {
        let (stop, n, port) = (stop.clone(), refusals.clone(), rx.port);
        let (d, fp) = (outsider.dir.clone(), rx.fp.clone());
        threads.push(std::thread::spawn(move || intruder(&d, port, &fp, stop, n)));
    }
    // Let the flood take hold before the honest sender arrives.
    std::thread::sleep(Duration::from_secs(3));
    let began = Instant::now();
    let run = sender.run("sync", &src, &rx.dest("v"), &rx.fp, &["--retry-for", "25s"]);
    let flood_s = began.elapsed().as_secs_f64() + 3.0;
    stop.store(true, Ordering::Relaxed);
    let log = rx.log();
    assert_eq!(
        run.code,
        0,
        "an honest sync during the flood failed: {}\nreceiver log (tail): {}",
        run.stderr,
        &log[log.len().saturating_sub(2000)..]
    );
    assert_eq!(hash_prefix(&dst, 8 * MIB), file_hash(&src), "bytes differ");
    let attempts = stalls.load(Ordering::Relaxed) + refusals.load(Ordering::Relaxed);
    let lines = log
        .lines()
        .filter(|l| l.contains("refused") || l.contains("handshake"))
        .count() as f64;
    eprintln!(
        "flood of {flood_s:.0} s: {} stalled handshakes, {} unauthorized attempts, {lines} refusal lines",
        stalls.load(Ordering::Relaxed),
        refusals.load(Ordering::Relaxed)
    );
    assert!(
        refusals.load(Ordering::Relaxed) >= 20,
        "the intruders made only {} attempts: the test proves nothing",
        refusals.load(Ordering::Relaxed)
    );
    assert!(
        lines <= 4.0 * (flood_s + 2.0) && lines * 4.0 < attempts as f64,
        "{lines} refusal lines for {attempts} attempts in {flood_s:.0} s: the log is not bounded\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    for t in threads {
        let _ = t.join();
    }
    eprintln!("receiver log:\n{}", rx.log());
}

// ---------------------------------------------------------------------------
// Item 10: authorized peers cannot hold slots or volumes forever.

/// Sends a sync Hello for volume `v` and waits for the Welcome.
async fn hello_sync(h: &mut AuthorizedPeer, size: u64, chunk: u32) {
    let hello = wire::Hello {
        chunk_size_explicit: true,
        pass_id: vec![7; 16],
        ..hello_for("v", Mode::Sync, size, chunk)
    };
    h.hello(hello).await.unwrap();
    h.expect_welcome().await;
}

/// Issue 13 item 10: 32 authorized connections, each holding 3 of the 4
/// header bytes of its first control frame, do not keep an honest sync out
/// beyond the hello deadline.
#[test]
fn partial_frame_headers_do_not_hold_session_slots() {
    let dir = scratch();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    random_file(&src, 4 * MIB, 17);
    let sender = SenderSide::new(dir.path(), "s");
    let rid = keygen(dir.path(), "r-id");
    // Four hostile identities of 8 connections each (the default cap per
    // sender) fill the default 32 slots.
    let hostile: Vec<Ident> = (0..4)
        .map(|i| keygen(dir.path(), &format!("h{i}")))
        .collect();
    let mut allow: Vec<&str> = hostile.iter().map(|h| h.fp.as_str()).collect();
    allow.push(&sender.id.fp);
    let rx = Receiver::start(&rid, &dir.path().join("r-state"), &[("v", &dst)], &allow, 0);
    let ids: Vec<Identity> = hostile
        .iter()
        .map(|h| Identity::load(&h.dir).unwrap())
        .collect();
    let rt = runtime();
    let _held: Vec<AuthorizedPeer> = rt.block_on(async {
        let mut held = Vec::new();
        for id in &ids {
            for _ in 0..8 {
                let mut h = AuthorizedPeer::connect(id, rx.port, &rx.fp, &Tuning::default()).await;
                h.send.write_all(&[0x10, 0, 0]).await.unwrap();
                held.push(h);
            }
        }
        held
    });
    let (run, refused) = sync_until_accepted(&sender, &src, &rx, Duration::from_secs(40));
    assert_eq!(
        run.code,
        0,
        "the slots stayed held: {}\nreceiver log: {}",
        run.stderr,
        rx.log()
    );
    assert!(
        refused > 0,
        "the 32 held connections never filled the slots: the test proves nothing"
    );
    assert_eq!(hash_prefix(&dst, 4 * MIB), file_hash(&src), "bytes differ");
    rx.assert_log_says(
        "no hello within",
        "the receiver did not say why it ended the held sessions",
    );
}

/// Issue 13 item 10: one sender fingerprint holds at most
/// `--max-sessions-per-sender` sessions; the next is refused with a reason
/// naming the flag, while another sender still gets in.
#[test]
fn one_sender_cannot_hold_more_than_its_session_cap() {
    let dir = scratch();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    random_file(&src, 4 * MIB, 23);
    let greedy = SenderSide::new(dir.path(), "greedy");
    let other = SenderSide::new(dir.path(), "other");
    let rid = keygen(dir.path(), "r-id");
    let rx = Receiver::start_with(
        &rid,
        &dir.path().join("r-state"),
        &[("v", &dst)],
        &[&greedy.id.fp, &other.id.fp],
        0,
        &["--max-sessions-per-sender", "2"],
    );
    let id = Identity::load(&greedy.id.dir).unwrap();
    let rt = runtime();
    let (held, reason) = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(AuthorizedPeer::connect(&id, rx.port, &rx.fp, &Tuning::default()).await);
        }
        let addr = format!("127.0.0.1:{}", rx.port).parse().unwrap();
        let (_ep, third) = transport::connect(&id, addr, &rx.fp, &Tuning::default())
            .await
            .expect("the handshake itself succeeds");
        let closed = tokio::time::timeout(Duration::from_secs(5), third.closed()).await;
        (held, closed)
    });
    match reason {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            let why = String::from_utf8_lossy(&c.reason).into_owned();
            assert!(why.contains("--max-sessions-per-sender"), "reason: {why}");
        }
        other => panic!("a third session of one sender was not refused: {other:?}"),
    }
    // What an operator sees from the same sender meanwhile.
    let run = greedy.run("sync", &src, &rx.dest("v"), &rx.fp, &["--retry-for", "0s"]);
    assert_ne!(run.code, 0, "a sender over its cap got a session");
    assert!(
        run.stderr.contains("--max-sessions-per-sender"),
        "the refusal does not name the limit: {}",
        run.stderr
    );
    // The cap is per sender: another one gets in.
    let run = other.run("sync", &src, &rx.dest("v"), &rx.fp, &["--retry-for", "0s"]);
    assert_eq!(run.code, 0, "another sender was kept out: {}", run.stderr);
    assert_eq!(hash_prefix(&dst, 4 * MIB), file_hash(&src), "bytes differ");
    assert!(
        held.iter().all(|h| h.conn.close_reason().is_none()),
        "the held sessions ended early: the test timing is off"
    );
}

/// An authorized peer opens a sync session on `v` (a sparse target of
/// `size` bytes at 4 KiB chunks), optionally asks for the manifest, and then
/// neither sends nor reads anything more. The volume must be free again
/// after the receiver's deadlines: an honest sync then succeeds.
fn stuck_session_lets_the_volume_go(test: &str, request_manifest: bool) {
    let dir = scratch();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    random_file(&src, 4 * MIB, 29);
    // 2 Mi chunks: a 64 MiB manifest table, far more than the flow-control
    // windows and the receiver's queues hold, so the writer's hand-off blocks.
    let size = 8u64 << 30;
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
    let (sender, rx) = pair(dir.path(), &[("v", &dst)]);
    let id = Identity::load(&sender.id.dir).unwrap();
    let rt = runtime();
    let small = Tuning {
        stream_window: 64 << 10,
        conn_window: 256 << 10,
        bbr: false,
        ..Tuning::default()
    };
    let _stuck = rt.block_on(async {
        let mut h = AuthorizedPeer::connect(&id, rx.port, &rx.fp, &small).await;
        hello_sync(&mut h, size, 4096).await;
        if request_manifest {
            transport::send_control(&mut h.send, Msg::ManifestRequest(wire::ManifestRequest {}))
                .await
                .unwrap();
        }
        h
    });
    let (run, refused) = sync_until_accepted(&sender, &src, &rx, Duration::from_secs(50));
    assert_eq!(
        run.code,
        0,
        "{test}: the volume stayed held: {}\nreceiver log: {}",
        run.stderr,
        rx.log()
    );
    assert!(
        refused > 0,
        "{test}: the stuck session never held the volume: the test proves nothing"
    );
    assert_eq!(hash_prefix(&dst, 4 * MIB), file_hash(&src), "bytes differ");
}

/// Issue 13 item 10: a ManifestRequest whose replies are never read does
/// not keep the volume's writer (and the volume) forever.
#[test]
fn unread_manifest_lets_the_volume_go() {
    stuck_session_lets_the_volume_go("unread_manifest_lets_the_volume_go", true);
}

/// Issue 13 item 10: a sync session that goes silent after its Welcome (no
/// heartbeat, no message) ends at the receiver's idle deadline.
#[test]
fn silent_sync_session_lets_the_volume_go() {
    stuck_session_lets_the_volume_go("silent_sync_session_lets_the_volume_go", false);
}

// ---------------------------------------------------------------------------
// Item 15: a crashed sender's volume goes to its rerun at once.

/// Spawns `sync` to volume `name` with piped stdout; returns the child and
/// a receiver of the moment its pass began (the receiver accepted the
/// session).
fn spawn_sync(
    sender: &SenderSide,
    src: &Path,
    rx: &Receiver,
    name: &str,
    extra: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<Instant>) {
    let mut child = sender
        .command("sync", src, &rx.dest(name), &rx.fp, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, started) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains("\"pass_start\"") {
                let _ = tx.send(Instant::now());
            }
        }
    });
    (child, started)
}

/// Issue 13 item 15: a sender SIGKILLed mid-pass and rerun at once gets its
/// volume at once (not after the 15 s idle timeout) and completes the copy.
#[test]
fn killed_sender_rerun_is_accepted_at_once() {
    let (_dir, src, dst, sender, rx) = source_and_volume("src.img", "dst.img", 256 * MIB, 37);
    let (mut first, started) = spawn_sync(&sender, &src, &rx, "v", &["--bwlimit", "32M"]);
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the first pass did not start");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first pass ended too soon"
    );
    first.kill().unwrap(); // SIGKILL: no close reaches the receiver
    let _ = first.wait();
    let t = Instant::now();
    let (rerun, started) = spawn_sync(&sender, &src, &rx, "v", &["--retry-for", "0s"]);
    let accepted = started.recv_timeout(Duration::from_secs(30)).ok();
    let out = rerun.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the rerun failed: {stderr}\nreceiver log: {}",
        rx.log()
    );
    let waited = accepted.expect("the rerun never started its pass") - t;
    assert!(
        waited < Duration::from_secs(8),
        "the rerun waited {waited:?} for the volume (the idle timeout is 15 s)"
    );
    assert_eq!(file_hash(&dst), file_hash(&src), "bytes differ");
    rx.assert_log_says(
        "does not answer",
        "the receiver did not say why it gave the volume away",
    );
}

/// Issue 13 item 15, the other half: a live sender mid-pass keeps its
/// volume; a second sender is refused at once (exit 2, "in use") and the
/// first finishes its pass.
#[test]
fn live_sender_keeps_its_volume() {
    let (dir, src, dst, sender, rx) = source_and_volume("src.img", "dst.img", 256 * MIB, 41);
    let second = SenderSide {
        id: Ident {
            dir: sender.id.dir.clone(),
            fp: sender.id.fp.clone(),
        },
        state: dir.path().join("second-state"),
    };
    let (first, started) = spawn_sync(&sender, &src, &rx, "v", &["--bwlimit", "32M"]);
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the first pass did not start");
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let run = second.run("sync", &src, &rx.dest("v"), &rx.fp, &["--retry-for", "0s"]);
    assert_eq!(run.code, 2, "second sender: {}", run.stderr);
    assert!(run.stderr.contains("in use"), "{}", run.stderr);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the refusal took {:?}",
        t.elapsed()
    );
    let out = first.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the live sender lost its pass: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_hash(&dst), file_hash(&src), "bytes differ");
}

// ---------------------------------------------------------------------------
// Item 16: hang-ups and exposed keys.

/// Issue 13 item 16: SIGHUP does not stop `serve`; a sync succeeds after it.
#[test]
fn sighup_does_not_stop_serve() {
    let (_dir, src, dst, sender, mut rx) = source_and_volume("src.img", "dst.img", 2 * MIB, 43);
    let pid = nix::unistd::Pid::from_raw(rx.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.child.try_wait().unwrap().is_none(),
        "serve died of SIGHUP: {}",
        rx.log()
    );
    sender.sync_ok(&src, &rx, "v", "sync");
    assert_eq!(hash_prefix(&dst, 2 * MIB), file_hash(&src), "bytes differ");
}

/// Issue 13 item 16: an identity key readable by others is warned about,
/// naming the file and the fix, by `serve` and by a sender.
#[test]
fn exposed_identity_key_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    random_file(&src, MIB, 47);
    let sender = SenderSide::new(dir.path(), "s");
    let rid = keygen(dir.path(), "r-id");
    for d in [&rid.dir, &sender.id.dir] {
        let key = d.join("key.der");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let rx = Receiver::start(
        &rid,
        &dir.path().join("r-state"),
        &[("v", &dst)],
        &[&sender.id.fp],
        0,
    );
    let rkey = rid.dir.join("key.der").display().to_string();
    assert!(
        wait_for(Duration::from_secs(5), || rx.log().contains(&rkey)),
        "serve did not warn about {rkey}: {}",
        rx.log()
    );
    let log = rx.log();
    let line = log.lines().find(|l| l.contains(&rkey)).unwrap();
    assert!(
        line.contains("warning") && line.contains("chmod 600"),
        "{line}"
    );
    let run = sender.sync_ok(&src, &rx, "v", "sync");
    let skey = sender.id.dir.join("key.der").display().to_string();
    assert!(
        run.stderr.contains(&skey) && run.stderr.contains("chmod 600"),
        "the sender did not warn about {skey}: {}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------
// Review of the merged code: verify and record sessions end, handshakes are
// capped per address, authorization comes before another session is touched.

/// Sends a `mode` Hello for `volume` of a `size`-byte source and waits for
/// the answer: the Welcome, or whatever else came.
async fn hello_mode(h: &mut AuthorizedPeer, volume: &str, mode: Mode, size: u64) -> Option<Msg> {
    let hello = wire::Hello {
        chunk_size_explicit: true,
        ..hello_for(volume, mode, size, 64 << 10)
    };
    h.hello(hello).await.ok()?;
    h.answer_within(Duration::from_secs(10)).await
}

/// Opens a verify session of `v` and reads every hash the receiver sends.
async fn verify_and_go_silent(
    id: &Identity,
    port: u16,
    fp: &str,
    size: u64,
) -> Option<AuthorizedPeer> {
    let mut h = AuthorizedPeer::try_connect(id, port, fp, &Tuning::default())
        .await
        .ok()?;
    match hello_mode(&mut h, "v", Mode::Verify, size).await {
        Some(Msg::Welcome(_)) => {}
        _ => return None,
    }
    loop {
        match transport::recv_control(&mut h.recv).await.ok()?? {
            Msg::VerifyPart(run) if run.last => return Some(h),
            Msg::VerifyPart(_) => {}
            _ => return None,
        }
    }
}

/// Review item 1: an authorized peer that opens a verify session, reads
/// the hashes and goes silent (QUIC keep-alive holds its connection) loses
/// the session at the idle deadline: with `--max-sessions-per-sender 1`
/// its fingerprint gets a new session after it, not before.
#[test]
fn silent_verify_session_frees_its_slot() {
    let dir = scratch();
    let dst = dir.path().join("dst.img");
    random_file(&dst, 4 * MIB, 53);
    let sender = SenderSide::new(dir.path(), "s");
    let rid = keygen(dir.path(), "r-id");
    let rx = Receiver::start_with(
        &rid,
        &dir.path().join("r-state"),
        &[("v", &dst)],
        &[&sender.id.fp],
        0,
        &["--max-sessions-per-sender", "1"],
    );
    let id = Identity::load(&sender.id.dir).unwrap();
    let rt = runtime();
    let (silent, second_at_once, later) = rt.block_on(async {
        let silent = verify_and_go_silent(&id, rx.port, &rx.fp, 4 * MIB)
            .await
            .expect("the first verify session is served");
        let began = Instant::now();
        let at_once = verify_and_go_silent(&id, rx.port, &rx.fp, 4 * MIB).await;
        let mut later = None;
        while later.is_none() && began.elapsed() < Duration::from_secs(45) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            later = verify_and_go_silent(&id, rx.port, &rx.fp, 4 * MIB).await;
        }
        (silent, at_once.is_some(), later.map(|_| began.elapsed()))
    });
    assert!(
        !second_at_once,
        "a second session was accepted while the first held the only slot: the test proves nothing"
    );
    let waited = later.unwrap_or_else(|| {
        panic!(
            "the silent verify session kept its slot for 45 s\nreceiver log: {}",
            rx.log()
        )
    });
    assert!(
        silent.conn.close_reason().is_some(),
        "the silent session is still open"
    );
    assert!(
        wait_for(Duration::from_secs(5), || rx
            .log()
            .contains("no control message from the sender")),
        "the receiver did not say why it ended the silent session: {}",
        rx.log()
    );
    eprintln!("the slot was free again after {waited:?}");
}

/// Review item 1: a record session whose Mark never comes is ended by the
/// receiver, with a reason, within a generous bound.
#[test]
fn record_session_without_a_mark_is_ended() {
    let dir = scratch();
    let dst = dir.path().join("dst.img");
    random_file(&dst, MIB, 59);
    let (sender, rx) = pair(dir.path(), &[("v", &dst)]);
    let id = Identity::load(&sender.id.dir).unwrap();
    let rt = runtime();
    let closed = rt.block_on(async {
        let mut h = AuthorizedPeer::connect(&id, rx.port, &rx.fp, &Tuning::default()).await;
        match hello_mode(&mut h, "v", Mode::Record, 0).await {
            Some(Msg::Welcome(_)) => {}
            other => panic!("expected a welcome, got {other:?}"),
        }
        tokio::time::timeout(Duration::from_secs(30), h.conn.closed()).await
    });
    assert!(
        closed.is_ok(),
        "a record session without a mark was still open after 30 s\nreceiver log: {}",
        rx.log()
    );
    assert!(
        wait_for(Duration::from_secs(5), || rx
            .log()
            .contains("no mark within")),
        "the receiver did not say why it ended the record session: {}",
        rx.log()
    );
}

/// Review item 1, the honest side: a remote `verify` whose source reads
/// far slower than the receiver hashes its target (`--read-limit`) keeps
/// its session alive past the receiver's idle deadline: it reports the one
/// chunk changed behind the receiver's back and gets the receiver to forget
/// it, so the next sync repairs the target.
#[test]
fn verify_with_a_slow_source_succeeds() {
    let (_dir, src, dst, sender, rx) = source_and_volume("src.img", "dst.img", 24 * MIB, 61);
    sender.sync_ok(&src, &rx, "v", "first sync");
    write_at(&dst, 5 * MIB, b"changed behind the receiver's back");
    let began = Instant::now();
    let run = sender.run(
        "verify",
        &src,
        &rx.dest("v"),
        &rx.fp,
        &["--read-limit", "1M"],
    );
    assert_eq!(
        run.code,
        1,
        "a slow but honest verify did not end with its finding (exit 1): {}\nreceiver log: {}",
        run.stderr,
        rx.log()
    );
    assert_eq!(run.event("verify_end")["mismatched_chunks"], 1);
    assert!(
        began.elapsed() > Duration::from_secs(18),
        "the source read in {:?}, within the receiver's idle deadline: the test proves nothing",
        began.elapsed()
    );
    sender.sync_ok(&src, &rx, "v", "sync after verify");
    assert_eq!(
        file_hash(&dst),
        file_hash(&src),
        "the receiver did not forget the differing chunk: the sync left it"
    );
}

/// Review item 2: one address cannot take every handshake slot. 72 clients
/// stalling inside the TLS handshake from 127.0.0.1 (more than the cap of
/// 64 per address) are refused beyond the cap, and the receiver says so.
#[test]
fn one_address_cannot_take_every_handshake_slot() {
    let dir = scratch();
    let dst = dir.path().join("dst.img");
    let (_sender, rx) = pair(dir.path(), &[("v", &dst)]);
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..72)
        .map(|_| {
            let (stop, n, port) = (stop.clone(), attempts.clone(), rx.port);
            std::thread::spawn(move || staller(port, stop, n))
        })
        .collect();
    let refused = wait_for(Duration::from_secs(20), || {
        rx.log()
            .contains("handshakes from 127.0.0.1 already in progress")
    });
    stop.store(true, Ordering::Relaxed);
    let log = rx.log();
    assert!(
        refused,
        "72 handshakes from one address were all let in ({} attempts)\nreceiver log: {log}",
        attempts.load(Ordering::Relaxed)
    );
    assert!(
        !log.contains("256 handshakes already in progress"),
        "one address reached the global cap: {log}"
    );
    for t in threads {
        let _ = t.join();
    }
}

/// Review item 3: a sender allowed only on volume `a` that asks for a
/// sync of `b`, whose holder is briefly silent (SIGSTOP), is refused
/// NotAuthorized before anything touches `b`'s session: the holder is not
/// taken for dead, and finishes its pass once resumed.
#[test]
fn unauthorized_hello_does_not_touch_another_volumes_holder() {
    use nix::sys::signal::{kill, Signal};
    let dir = scratch();
    let src = dir.path().join("src.img");
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    random_file(&src, 256 * MIB, 67);
    let holder = SenderSide::new(dir.path(), "holder");
    let limited = SenderSide::new(dir.path(), "limited");
    let rid = keygen(dir.path(), "r-id");
    let only_a = format!("{}=a", limited.id.fp);
    let rx = Receiver::start(
        &rid,
        &dir.path().join("r-state"),
        &[("a", &a), ("b", &b)],
        &[&holder.id.fp, &only_a],
        0,
    );
    let (first, started) = spawn_sync(
        &holder,
        &src,
        &rx,
        "b",
        &["--bwlimit", "32M", "--retry-for", "0s"],
    );
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the holder's pass did not start");
    std::thread::sleep(Duration::from_secs(1));
    let pid = nix::unistd::Pid::from_raw(first.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let run = limited.run("sync", &src, &rx.dest("b"), &rx.fp, &["--retry-for", "0s"]);
    kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(run.code, 2, "limited sender: {}", run.stderr);
    assert!(
        run.stderr.contains("not authorized"),
        "the refusal does not say why: {}",
        run.stderr
    );
    let out = first.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the holder lost its pass to an unauthorized hello: {}\nreceiver log: {}",
        String::from_utf8_lossy(&out.stderr),
        rx.log()
    );
    assert!(
        !rx.log().contains("does not answer"),
        "the receiver checked the holder's liveness for an unauthorized sender: {}",
        rx.log()
    );
    assert_eq!(file_hash(&b), file_hash(&src), "bytes differ");
}
