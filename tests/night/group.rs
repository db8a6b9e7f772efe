//! A whole filer's night: two ext4 volumes on loop devices under live
//! writers, synced by one plan, then cut over together by `cutover --plan`
//! (one freeze, one group consistency point), and the same night failing in
//! one volume (every source thawed, no volume certified).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cutover::{assert_image_intact, assert_writable, seed_files, Fs, Load, Writer, TOOLS};
use crate::harness::*;

/// Two filesystems, a receiver exporting `a` and `b` into image files, a
/// sender, and the plan naming them. Fields drop in order: receiver, then
/// the filesystems.
struct Filer {
    rx: Receiver,
    sender: SenderSide,
    a: Fs,
    b: Fs,
    targets: [PathBuf; 2],
    rstate: PathBuf,
    plan: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Filer {
    /// `freeze_b`: volume b freezes its own mount (else the plan's
    /// `filer` lines decide: `assume_frozen = true`).
    fn new(freeze_b: bool, filer: &str) -> Filer {
        let dir = scratch();
        let root = dir.path().to_owned();
        let (a, b) = (Fs::new(&root, "a"), Fs::new(&root, "b"));
        let sender = SenderSide::new(&root, "s");
        let rid = keygen(&root, "r-id");
        let targets = [root.join("ta.img"), root.join("tb.img")];
        let rstate = root.join("r-state");
        let rx = Receiver::start(
            &rid,
            &rstate,
            &[("a", &targets[0]), ("b", &targets[1])],
            &[&sender.id.fp],
            0,
        );
        let plan = root.join("filer01.toml");
        let b_freeze = if freeze_b {
            format!("fsfreeze = \"{}\"\n", b.dir().display())
        } else {
            String::new()
        };
        std::fs::write(
            &plan,
            format!(
                "receiver = \"127.0.0.1:{}\"\nserver_fingerprint = \"{}\"\njobs = 2\n{filer}\n\
                 [[volume]]\nname = \"a\"\nsource = \"{}\"\nfsfreeze = \"{}\"\n\n\
                 [[volume]]\nname = \"b\"\nsource = \"{}\"\n{b_freeze}",
                rx.port,
                rx.fp,
                a.lo.dev.display(),
                a.dir().display(),
                b.lo.dev.display(),
            ),
        )
        .unwrap();
        Filer {
            rx,
            sender,
            a,
            b,
            targets,
            rstate,
            plan,
            root,
            _dir: dir,
        }
    }

    /// `nightpass CMD --plan PLAN --json` as this sender.
    fn run(&self, cmd: &str, extra: &[&str]) -> Run {
        let mut c = Command::new(bin());
        c.arg(cmd).arg("--plan").arg(&self.plan);
        c.arg("--identity").arg(&self.sender.id.dir);
        c.arg("--state-dir").arg(&self.sender.state);
        c.arg("--json").args(extra);
        run_command(c)
    }

    /// The receiver's journal of volume `name`.
    fn receiver_journal(&self, name: &str) -> Vec<Value> {
        let p = self.rstate.join("volumes").join(name).join("journal.jsonl");
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn mounts(&self) -> [&Path; 2] {
        [self.a.dir(), self.b.dir()]
    }
}

/// The `cutover_end` event of volume `name` in a plan run.
fn cutover_end<'a>(r: &'a Run, name: &str) -> &'a Value {
    r.all("cutover_end")
        .into_iter()
        .find(|e| e["volume"] == name)
        .unwrap_or_else(|| panic!("no cutover_end of {name}: {}", r.context()))
}

/// Both filesystems frozen at once and cut over by one plan: each copy is a
/// clean filesystem with every file intact, and the group consistency
/// point is BLAKE3 over the volumes' points in name order, the same in the
/// receiver's journal of each volume; both volumes are sealed after.
#[test]
fn a_group_cutover_certifies_every_volume_under_one_point() {
    if !need_root(
        "a_group_cutover_certifies_every_volume_under_one_point",
        TOOLS,
    ) {
        return;
    }
    let f = Filer::new(true, "");
    for (i, m) in f.mounts().iter().enumerate() {
        seed_files(&m.join("data"), 8, 256 << 10, 301 + i as u64);
    }
    let mut writers: Vec<Writer> = f
        .mounts()
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Writer::start(
                m,
                Load::Files {
                    live_limit: 8 << 20,
                },
                310 + i as u64,
            )
        })
        .collect();
    assert!(wait_for(Duration::from_secs(10), || writers
        .iter()
        .all(|w| w.created() >= 20)));
    for _ in 0..2 {
        let r = f.run("sync", &[]);
        assert_eq!(r.code, 0, "{}", r.context());
    }
    let r = f.run("cutover", &[]);
    assert_eq!(r.code, 0, "{}", r.context());
    for w in &mut writers {
        w.stop();
    }
    let group = r.event("group_cutover_end");
    assert_eq!(group["volumes"], serde_json::json!(["a", "b"]), "{group}");
    let mut bytes = Vec::new();
    for name in ["a", "b"] {
        let cp = cutover_end(&r, name)["consistency_point"]
            .as_str()
            .unwrap()
            .to_string();
        bytes.extend(data_encoding::HEXLOWER.decode(cp.as_bytes()).unwrap());
    }
    let point = blake3::hash(&bytes).to_hex().to_string();
    assert_eq!(group["consistency_point"], point.as_str(), "{group}");
    for name in ["a", "b"] {
        let last = f.receiver_journal(name).pop().expect("a receiver record");
        assert_eq!(last["group_point"], point.as_str(), "{last}");
    }
    // status --plan shows the cutover, sealed, with the group's point.
    let mut c = Command::new(bin());
    c.args(["status", "--json", "--plan"]).arg(&f.plan);
    c.arg("--state-dir").arg(&f.sender.state);
    let st = run_command(c);
    assert_eq!(st.all("plan_volume").len(), 2, "{}", st.context());
    for l in st.all("plan_volume") {
        assert_eq!(l["state"], "cut_over", "{l}");
        assert_eq!(l["cut_over"]["sealed"], true, "{l}");
        assert_eq!(
            l["cut_over"]["group_consistency_point"],
            point.as_str(),
            "{l}"
        );
    }
    assert!(st.all("plan_forecast").is_empty(), "{}", st.context());
    for (i, t) in f.targets.iter().enumerate() {
        assert_image_intact(&f.root, t, &format!("copy{i}"));
    }
    for m in f.mounts() {
        assert_writable(m, "after-group", "a group cutover must thaw every volume");
    }
    let again = f.run("sync", &[]);
    assert_ne!(
        again.code,
        0,
        "a sealed filer took another pass: {}",
        again.context()
    );
    drop(f.rx);
}

/// One volume fails during the group cutover (b is frozen by the plan's
/// `assume_frozen`, but a writer keeps changing it): the cutover fails
/// (exit 3), every volume is thawed, none is certified or sealed on the
/// receiver, and the next plan pass is accepted.
#[test]
fn a_failure_of_one_volume_thaws_all_and_certifies_none() {
    if !need_root(
        "a_failure_of_one_volume_thaws_all_and_certifies_none",
        TOOLS,
    ) {
        return;
    }
    let f = Filer::new(false, "assume_frozen = true");
    for (i, m) in f.mounts().iter().enumerate() {
        seed_files(&m.join("data"), 8, 256 << 10, 401 + i as u64);
    }
    for _ in 0..2 {
        let r = f.run("sync", &[]);
        assert_eq!(r.code, 0, "{}", r.context());
    }
    let mut writer = Writer::start(
        f.b.dir(),
        Load::Overwrite {
            size: 8 << 20,
            rate: 16 << 20,
        },
        411,
    );
    assert!(wait_for(Duration::from_secs(10), || writer.written() >= 4 << 20));
    let r = f.run("cutover", &[]);
    writer.stop();
    assert_eq!(r.code, 3, "{}", r.context());
    assert!(r.all("group_cutover_end").is_empty(), "{}", r.context());
    assert!(r.all("cutover_end").is_empty(), "{}", r.context());
    assert!(
        r.stderr.contains("volume 'b'"),
        "the error names the volume: {}",
        r.stderr
    );
    // As every event of a plan run, the error carries the volume; each
    // volume ends, and the run with plan_end.
    let errors = r.all("error");
    assert_eq!(errors.len(), 1, "{}", r.context());
    assert_eq!(errors[0]["volume"], "b", "{}", r.context());
    let ends: Vec<(String, String)> = r
        .all("volume_end")
        .iter()
        .map(|e| {
            (
                e["volume"].as_str().unwrap().into(),
                e["result"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        ends,
        [
            ("a".into(), "not_certified".into()),
            ("b".into(), "failed".into())
        ],
        "{}",
        r.context()
    );
    assert_eq!(r.only("plan_end")["succeeded"], 0, "{}", r.context());
    assert!(
        r.events.iter().all(|e| e.get("volume").is_some()),
        "{}",
        r.context()
    );
    for name in ["a", "b"] {
        assert!(
            f.receiver_journal(name)
                .iter()
                .all(|e| e["event"] != "cutover"),
            "volume {name} was certified by a failed group cutover"
        );
    }
    assert_writable(
        f.a.dir(),
        "after-failed-group",
        "a failed group cutover must thaw a",
    );
    let again = f.run("sync", &[]);
    assert_eq!(again.code, 0, "{}", again.context());
    drop(f.rx);
}

/// An interrupt right after the thaw, while the volumes' consistency
/// points are being recorded on the receiver (the operator's `post`
/// command signals the sender 5 ms after it runs), never leaves the group
/// sealed in part: the recording ends first, and every volume is sealed,
/// or, had the signal come before the recording began, none.
#[test]
fn an_interrupt_while_recording_leaves_all_sealed_or_none() {
    if !need_root(
        "an_interrupt_while_recording_leaves_all_sealed_or_none",
        TOOLS,
    ) {
        return;
    }
    let post = "(sleep 0.005; kill -INT $PPID) >/dev/null 2>&1 &";
    let f = Filer::new(false, &format!("pre = \"true\"\npost = \"{post}\""));
    for (i, m) in f.mounts().iter().enumerate() {
        seed_files(&m.join("data"), 4, 256 << 10, 501 + i as u64);
    }
    for _ in 0..2 {
        let r = f.run("sync", &[]);
        assert_eq!(r.code, 0, "{}", r.context());
    }
    let r = f.run("cutover", &[]);
    let sealed: Vec<bool> = ["a", "b"]
        .iter()
        .map(|n| {
            f.receiver_journal(n)
                .iter()
                .any(|e| e["event"] == "cutover")
        })
        .collect();
    assert!(
        sealed.iter().all(|s| *s) || sealed.iter().all(|s| !*s),
        "a group sealed in part ({sealed:?}): {}",
        r.context()
    );
    if sealed[0] {
        assert_eq!(r.code, 0, "{}", r.context());
        assert!(!r.all("group_cutover_end").is_empty(), "{}", r.context());
    }
    for m in f.mounts() {
        assert_writable(
            m,
            "after-interrupt",
            "an interrupted group cutover must thaw",
        );
    }
    drop(f.rx);
}
