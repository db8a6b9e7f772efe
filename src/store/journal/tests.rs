//! Tests of the journals' records and file format.

use super::*;

/// A sender's journal as the release before typed records wrote it
/// (two syncs, a cutover with `--assume-frozen`, its unseal, a sync).
const SENDER_LINES: &str = r#"{"attempts":1,"changed_bytes":8388608,"changed_chunks":128,"chunk_size":65536,"duration_s":0.237829448,"event":"pass","first":true,"kind":"sync","pass":1,"proof_read":false,"read_busy_s":0.01828006,"read_rate_bps":458893898.597707,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":35271527.85554125,"sent_bytes":8388608,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.3569689,"volume":"127.0.0.1:46901/v","zero_chunks":0}
{"attempts":1,"changed_bytes":0,"changed_chunks":0,"chunk_size":65536,"duration_s":0.029614599,"event":"pass","first":false,"kind":"sync","pass":2,"proof_read":false,"read_busy_s":0.006968401,"read_rate_bps":1203806726.9664876,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":0.0,"sent_bytes":0,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.6149466,"volume":"127.0.0.1:46901/v","zero_chunks":0}
{"attempts":1,"changed_bytes":0,"changed_chunks":0,"chunk_size":65536,"duration_s":0.011365334,"event":"pass","first":false,"kind":"cutover","pass":3,"proof_read":true,"read_busy_s":0.003276009,"read_rate_bps":2560618117.9599934,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":0.0,"sent_bytes":0,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.7111144,"volume":"127.0.0.1:46901/v","zero_chunks":0}
{"duration_s":0.025707167,"event":"target_read","size_bytes":8388608}
{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","event":"cutover","forecast_s":0.104770849,"freeze_unix_s":1795987709.672407,"frozen_s":0.051266855,"method":"assume-frozen","passes_s":0.011365334,"proved":true,"volume":"127.0.0.1:46901/v"}
{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","event":"unsealed","unix_s":1795987709.8095195}
{"attempts":1,"changed_bytes":0,"changed_chunks":0,"chunk_size":65536,"duration_s":0.033076107,"event":"pass","first":false,"kind":"sync","pass":4,"proof_read":false,"read_busy_s":0.003740584,"read_rate_bps":2242593135.189585,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":0.0,"sent_bytes":0,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.9121883,"volume":"127.0.0.1:46901/v","zero_chunks":0}
"#;

/// The receiver's journal of the same volume, as that release wrote it.
const RECEIVER_LINES: &str = r#"{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","event":"cutover","freeze_unix_s":1795987709.672407,"frozen_s":0.051266855,"sealed_at":"2026-11-29T21:28:29Z","volume":"v"}
{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","cutover_at":"2026-11-29T21:28:29Z","event":"unsealed","unsealed_at":"2026-11-29T21:28:29Z","volume":"v"}
"#;

const CP: &str = "9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98";

fn sender(text: &str) -> Vec<SenderRecord> {
    decode(text.as_bytes()).unwrap()
}

fn pass(n: u64) -> PassRecord {
    PassRecord {
        kind: "sync".into(),
        source: "/dev/vg0/filer01".into(),
        volume: "10.0.0.2:7400/filer01".into(),
        pass: n,
        first: n == 1,
        proof_read: Some(false),
        attempts: Some(2),
        start_unix_s: 1_796_000_000.25,
        duration_s: 12.5,
        size_bytes: 1 << 30,
        chunk_size: 65536,
        scanned_bytes: 1 << 30,
        read_busy_s: 2.0,
        changed_chunks: 3,
        changed_bytes: 3 * 65536,
        sent_bytes: 100_000,
        zero_chunks: 1,
        read_rate_bps: 536_870_912.0,
        send_rate_bps: 8000.0,
        root: CP.into(),
        scan: Some("tracked".into()),
        scan_reason: None,
    }
}

fn every_sender_record() -> Vec<SenderRecord> {
    vec![
        SenderRecord::Pass(pass(1)),
        SenderRecord::TargetRead(TargetReadRecord {
            size_bytes: 1 << 30,
            duration_s: 4.0,
        }),
        SenderRecord::Cutover(CutoverRecord {
            volume: "10.0.0.2:7400/filer01".into(),
            consistency_point: CP.into(),
            freeze_unix_s: 1_796_000_100.5,
            frozen_s: 3.25,
            passes_s: Some(3.0),
            method: "fsfreeze".into(),
            proved: true,
            forecast_s: None,
            proof: Some("tracked".into()),
            proof_s: Some(0.75),
        }),
        SenderRecord::Unsealed(UnsealedRecord {
            consistency_point: CP.into(),
            unix_s: 1_796_000_200.0,
        }),
        SenderRecord::GroupCutover(GroupCutoverRecord {
            consistency_point: CP.into(),
            volumes: vec!["filer01-a".into(), "filer01-b".into()],
            freeze_unix_s: 1_796_000_300.0,
            frozen_s: 2.5,
        }),
    ]
}

fn every_receiver_record() -> Vec<ReceiverRecord> {
    vec![
        ReceiverRecord::Cutover(ReceiverCutoverRecord {
            volume: "filer01".into(),
            consistency_point: CP.into(),
            freeze_unix_s: 1_796_000_100.5,
            frozen_s: 3.25,
            sealed_at: Some("2026-11-30T01:12:09Z".into()),
            group_point: Some("ab".repeat(32)),
            group_volumes: vec!["filer01".into(), "filer02".into()],
        }),
        ReceiverRecord::Unsealed(ReceiverUnsealedRecord {
            volume: "filer01".into(),
            consistency_point: CP.into(),
            cutover_at: "2026-11-30T01:12:09Z".into(),
            unsealed_at: "2026-11-30T09:00:00Z".into(),
        }),
    ]
}

#[test]
fn every_record_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = Journal::<SenderRecord>::in_dir(&dir.path().join("targets/x/v"));
    for r in every_sender_record() {
        s.append(&r).unwrap();
    }
    assert_eq!(s.read().unwrap(), every_sender_record());
    let r = Journal::<ReceiverRecord>::in_dir(&dir.path().join("volumes/v"));
    for rec in every_receiver_record() {
        r.append(&rec).unwrap();
    }
    assert_eq!(r.read().unwrap(), every_receiver_record());
    // Each line carries the format version and the event name.
    let text = fs::read_to_string(s.path()).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["v"], 1, "{line}");
        assert!(v["event"].is_string(), "{line}");
    }
    assert!(text.starts_with(r#"{"v":1,"event":"pass","#), "{text}");
}

#[test]
fn a_journal_of_the_previous_format_reads_as_it_was() {
    let records = sender(SENDER_LINES);
    assert_eq!(records.len(), 7);
    let passes: Vec<_> = passes(&records).collect();
    assert_eq!(
        passes.iter().map(|p| p.pass).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(passes[0].changed_chunks, 128);
    assert_eq!(passes[2].kind, "cutover");
    assert_eq!(passes[2].proof_read, Some(true));
    let h = figures(&records);
    assert_eq!(h.passes.len(), 4);
    assert!(h.passes[0].first && !h.passes[1].first);
    assert_eq!(h.passes[1].read_busy_s, 0.006968401);
    assert_eq!(h.target_read_rates, [8388608.0 / 0.025707167]);
    assert_eq!(
        h.cutovers,
        [CutoverFigures {
            frozen_s: 0.051266855,
            passes_s: 0.011365334,
            proof_s: 0.0,
        }]
    );
    // Unsealed after the cutover: nothing holds passes back.
    assert_eq!(sealed_cutover(&records), None);
    let upto_cutover: String = SENDER_LINES
        .lines()
        .take(5)
        .map(|l| format!("{l}\n"))
        .collect();
    let records = sender(&upto_cutover);
    let cut = sealed_cutover(&records).expect("the cutover seals it");
    assert_eq!(cut.consistency_point, CP);
    assert_eq!(cut.freeze_unix_s, 1795987709.672407);
    let rx: Vec<ReceiverRecord> = decode(RECEIVER_LINES.as_bytes()).unwrap();
    assert_eq!(rx.len(), 2);
    assert_eq!(last_unsealed(&rx), Some(CP));
    assert_eq!(last_unsealed(&rx[..1]), None);
}

#[test]
fn pass_records_print_the_fields_the_journal_kept() {
    // `status --json` prints pass records: typed, they must show the
    // same fields and values as the lines they were read from.
    for line in SENDER_LINES
        .lines()
        .filter(|l| l.contains(r#""event":"pass""#))
    {
        let kept: serde_json::Value = serde_json::from_str(line).unwrap();
        let record: SenderRecord = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_value(&record).unwrap(), kept);
    }
    // Older passes, without `proof_read` and `attempts`, print without them.
    let old = r#"{"event":"pass","kind":"sync","source":"s","volume":"h:1/v","pass":1,"first":true,"start_unix_s":1.5,"duration_s":2.0,"size_bytes":4096,"chunk_size":4096,"scanned_bytes":4096,"read_busy_s":0.5,"changed_chunks":1,"changed_bytes":4096,"sent_bytes":4096,"zero_chunks":0,"read_rate_bps":8192.0,"send_rate_bps":2048.0,"root":"ab"}"#;
    let kept: serde_json::Value = serde_json::from_str(old).unwrap();
    let record: SenderRecord = serde_json::from_str(old).unwrap();
    assert_eq!(serde_json::to_value(&record).unwrap(), kept);
    // And a cutover recorded without passes_s is no measurement.
    let old_cut = r#"{"event":"cutover","volume":"h:1/v","consistency_point":"ab","freeze_unix_s":1.0,"frozen_s":2.0,"method":"fsfreeze","proved":true,"forecast_s":null}"#;
    let records = sender(old_cut);
    assert!(figures(&records).cutovers.is_empty());
    assert!(sealed_cutover(&records).is_some());
}

#[test]
fn torn_lines_and_unknown_events_are_skipped() {
    let mut text = String::from(SENDER_LINES);
    text.push_str("{\"event\":\"rebased\",\"v\":1,\"to\":\"elsewhere\"}\n");
    text.push('\n');
    // A crash in the middle of an append.
    let torn = SENDER_LINES.lines().next().unwrap();
    text.push_str(&torn[..torn.len() / 2]);
    let records = sender(&text);
    assert_eq!(records, sender(SENDER_LINES));
}

#[test]
fn a_newer_format_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::<SenderRecord>::in_dir(dir.path());
    j.append(&SenderRecord::Pass(pass(1))).unwrap();
    let mut f = OpenOptions::new().append(true).open(j.path()).unwrap();
    f.write_all(b"{\"v\":2,\"event\":\"pass\",\"pass\":2}\n")
        .unwrap();
    let e = j.read().unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("format 2"), "{e}");
}

#[test]
fn a_missing_journal_is_empty_and_an_unreadable_one_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::<SenderRecord>::in_dir(dir.path());
    assert_eq!(j.read().unwrap(), Vec::new());
    fs::create_dir(j.path()).unwrap();
    let e = j.read().unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e:?}");
    assert_eq!(e.exit_code(), 3);
    assert!(
        e.to_string().contains(&j.path().display().to_string()),
        "{e}"
    );
}
