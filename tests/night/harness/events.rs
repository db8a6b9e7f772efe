//! A command's `--json` output: every stdout line one JSON object with an
//! `event`, parsed into a [`Run`], and the assertions tests make on it.

use serde_json::Value;

/// The outcome of a nightpass command run with `--json`.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages (empty when not known).
    pub desc: String,
    /// Exit status (-1 when killed by a signal).
    pub code: i32,
    /// Parsed stdout lines.
    pub events: Vec<Value>,
    /// Stderr text.
    pub stderr: String,
}

/// Parses JSON-lines output; every stdout line (a blank one too) must be a
/// JSON object with a string `event`.
pub fn parse_run(code: i32, stdout: &[u8], stderr: &[u8]) -> Run {
    let text = String::from_utf8_lossy(stdout);
    let stderr = String::from_utf8_lossy(stderr).into_owned();
    let events = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("stdout line is not JSON ({e}): {l:?}\nstderr:\n{stderr}")
            });
            assert!(
                v.get("event").is_some_and(Value::is_string),
                "JSON line without a string \"event\": {l}"
            );
            v
        })
        .collect();
    Run {
        desc: String::new(),
        code,
        events,
        stderr,
    }
}

impl Run {
    /// The command, its status, events and stderr, for failure messages.
    pub fn context(&self) -> String {
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

    /// The first event named `name`.
    #[track_caller]
    pub fn event(&self, name: &str) -> &Value {
        self.events
            .iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| panic!("no {name} event\n{}", self.context()))
    }

    /// Every event named `name`.
    pub fn all(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }

    /// The only event named `name` (a failure when there are none or several).
    #[track_caller]
    pub fn only(&self, name: &str) -> &Value {
        let found = self.all(name);
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {name:?} event\n{}",
            self.context()
        );
        found[0]
    }

    /// Asserts exit status 0 and no `error` event; returns self.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "the command failed\n{}", self.context());
        assert!(
            !self.events.iter().any(|e| e["event"] == "error"),
            "exit 0 with an error event\n{}",
            self.context()
        );
        self
    }

    /// An unsigned integer field of the only `event`.
    #[track_caller]
    pub fn num(&self, event: &str, field: &str) -> u64 {
        let e = self.only(event);
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
        let ctx = self.context();
        for ev in ["pass_start", "pass_end"] {
            assert_eq!(self.num(ev, "pass"), pass, "{ev}.pass\n{ctx}");
            assert_eq!(self.num(ev, "size_bytes"), size, "{ev}.size_bytes\n{ctx}");
            assert_eq!(self.num(ev, "chunk_size"), chunk, "{ev}.chunk_size\n{ctx}");
            assert!(self.only(ev)["volume"].is_string(), "{ev}.volume\n{ctx}");
        }
        let at = |name: &str| self.events.iter().position(|e| e["event"] == name).unwrap();
        assert!(
            at("pass_start") < at("pass_end"),
            "pass_end before pass_start\n{ctx}"
        );
        assert_eq!(
            self.num("pass_end", "scanned_bytes"),
            size,
            "pass_end.scanned_bytes\n{ctx}"
        );
        let end = self.only("pass_end");
        assert!(
            end["duration_s"].as_f64().is_some_and(|d| d >= 0.0),
            "pass_end.duration_s\n{ctx}"
        );
        let f = &end["forecast_final_pass_s"];
        assert!(
            f.is_null() || f.is_number(),
            "pass_end.forecast_final_pass_s must be a number or null\n{ctx}"
        );
        self
    }

    /// Asserts a refusal: exit status 2, `needle` in stderr (case-insensitive),
    /// an `error` event with a message on stdout, and no pass_end.
    #[track_caller]
    pub fn assert_refused(&self, needle: &str) {
        let ctx = self.context();
        assert_eq!(self.code, 2, "expected exit status 2\n{ctx}");
        assert!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "stderr does not mention {needle:?}\n{ctx}"
        );
        let err = self
            .events
            .iter()
            .find(|e| e["event"] == "error")
            .unwrap_or_else(|| panic!("no error event on stdout\n{ctx}"));
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error event without a message\n{ctx}"
        );
        assert!(
            !self.events.iter().any(|e| e["event"] == "pass_end"),
            "a refused sync reported a pass_end\n{ctx}"
        );
    }
}
