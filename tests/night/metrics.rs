//! `--metrics HOST:PORT`: Prometheus metrics over HTTP at /metrics, on the
//! sender's commands and on `serve`, scraped here as Prometheus would, with
//! a plain HTTP GET; a bad or busy address is refused at start (exit 2).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET /metrics` on 127.0.0.1:`port`, or `None` when nothing
/// answers there (yet).
pub(crate) fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET /metrics answered {head:?}"
    );
    Some(body.to_string())
}

/// The value of metric `name` whose labels include `label` (e.g.
/// `volume="vol"`), if the scrape has it.
pub(crate) fn value(body: &str, name: &str, label: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A scrape of `port`, waiting up to 10 s for the endpoint to answer.
pub(crate) fn scrape_when_up(port: u16) -> String {
    let mut body = None;
    wait_for(Duration::from_secs(10), || {
        body = scrape(port);
        body.is_some()
    });
    body.unwrap_or_else(|| panic!("nothing serves metrics on 127.0.0.1:{port}"))
}

/// During a pass held to 8 MiB/s, two scrapes of the sender's endpoint a
/// second apart show the bytes sent growing and a pass in progress; after
/// it, the receiver's endpoint shows every byte and chunk written, the
/// session ended `ok`, and a session to a volume it does not export as a
/// refusal.
#[test]
fn metrics_show_the_bytes_of_a_throttled_pass() {
    let s = Setup::new();
    let size = 32 * MIB;
    let (source, target) = (s.path("source.img"), s.path("target.img"));
    random_file(&source, size, 170);
    let (rport, sport) = (free_port(), free_port());
    let raddr = format!("127.0.0.1:{rport}");
    let rx = Receiver::start_with(
        &s.receiver_ident(),
        &s.receiver_state,
        &[("vol", &target)],
        &[&s.sender_fp],
        0,
        &["--metrics", &raddr],
    );
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");
    let saddr = format!("127.0.0.1:{sport}");
    let pass = tx.spawn_sync(&source, &dest, &["--bwlimit", "8M", "--metrics", &saddr]);
    pass.expect_event("pass_start", Duration::from_secs(30));
    let sent = format!("volume=\"{dest}\"");
    let first = scrape_when_up(sport);
    std::thread::sleep(Duration::from_millis(1500));
    let second = scrape(sport).expect("the sender's endpoint answers during the pass");
    let (a, b) = (
        value(&first, "nightpass_sent_bytes_total", &sent).unwrap_or(0.0),
        value(&second, "nightpass_sent_bytes_total", &sent)
            .unwrap_or_else(|| panic!("no bytes sent in:\n{second}")),
    );
    assert!(
        b > a,
        "bytes sent did not grow between scrapes: {a} then {b}"
    );
    assert!(
        b < size as f64,
        "the pass was not throttled: {b} bytes already sent"
    );
    assert_eq!(
        value(&second, "nightpass_pass_in_progress", &sent),
        Some(1.0),
        "{second}"
    );
    assert!(
        value(&second, "nightpass_scanned_bytes_total", &sent).is_some_and(|v| v >= b),
        "{second}"
    );
    let run = pass.finish(COMMAND_TIMEOUT);
    run.ok();

    let body = scrape_when_up(rport);
    let vol = "volume=\"vol\"";
    assert_eq!(
        value(&body, "nightpass_written_bytes_total", vol),
        Some(size as f64),
        "{body}"
    );
    assert_eq!(
        value(&body, "nightpass_chunks_written_total", vol),
        Some(chunk_count(size, CHUNK) as f64),
        "{body}"
    );
    assert_eq!(
        value(&body, "nightpass_sessions_total", "result=\"ok\""),
        Some(1.0),
        "{body}"
    );
    assert!(
        body.contains("# HELP nightpass_written_bytes_total"),
        "{body}"
    );

    let refused = tx.sync(&source, &rx.dest("nope"), &[]);
    assert_eq!(refused.code, 2, "{}", refused.context());
    let body = scrape(rport).expect("the receiver's endpoint answers");
    assert_eq!(
        value(
            &body,
            "nightpass_refusals_total",
            "reason=\"unknown_volume\""
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "nightpass_sessions_total", "result=\"refused\""),
        Some(1.0),
        "{body}"
    );
}

/// `--metrics` on a port another program holds: `sync` and `serve` stop at
/// once with exit 2 and say why, before anything else.
#[test]
fn metrics_on_a_taken_port_is_exit_2() {
    let s = Setup::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let source = s.path("source.img");
    random_file(&source, MIB, 171);
    let tx = Sender {
        identity: s.sender_id.clone(),
        state_dir: s.sender_state.clone(),
        server_fp: s.receiver_fp.clone(),
    };
    let r = tx.sync(&source, "127.0.0.1:9/vol", &["--metrics", &addr]);
    assert_eq!(r.code, 2, "{}", r.context());
    assert!(r.stderr.contains("--metrics"), "{}", r.context());
    assert!(r.all("pass_start").is_empty(), "{}", r.context());

    let mut serve = Command::new(bin());
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics", &addr])
        .arg("--identity")
        .arg(&s.receiver_id)
        .arg("--state-dir")
        .arg(&s.receiver_state)
        .args(["--allow", &s.sender_fp])
        .arg("--volume")
        .arg(format!("vol={}", s.path("target.img").display()));
    let r = run_command(serve);
    assert_eq!(
        r.code,
        2,
        "serve with a taken --metrics port: {}",
        r.context()
    );
    assert!(r.stderr.contains("--metrics"), "{}", r.context());

    let r = tx.sync(
        &source,
        "127.0.0.1:9/vol",
        &["--metrics", "no-such-host.invalid:1"],
    );
    assert_eq!(r.code, 2, "a bad --metrics address: {}", r.context());
    drop(taken);
}
