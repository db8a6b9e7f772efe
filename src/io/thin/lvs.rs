//! A thin volume's identity as `lvs` reports it: its volume group, pool,
//! thin id and LV UUID, which the epoch rules compare from pass to pass.
//!
//! Owns the reading of `lvs --reportformat json -o` [`FIELDS`] (shape from
//! lvmreport(7), "Changing output format"; the attribute letters from
//! lvs(8), NOTES) and the device-mapper names LVM gives a pool's layers.
//! Must not change anything in LVM.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::{Error, Result};

/// The fields asked of `lvs`, in order.
pub const FIELDS: &str = "lv_name,vg_name,lv_uuid,pool_lv,thin_id,lv_attr";

/// What identifies a thin volume across passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinVolume {
    /// The LV's name.
    pub lv: String,
    /// Its volume group.
    pub vg: String,
    /// Its LV UUID (new for every LV created, whatever its name).
    pub lv_uuid: String,
    /// The thin pool it lives in (an LV of the same group).
    pub pool: String,
    /// Its thin device id inside the pool: what `thin_delta --snap1/--snap2`
    /// take.
    pub thin_id: u64,
}

impl ThinVolume {
    /// The pool's device-mapper name, to which pool messages go
    /// (`dmsetup message NAME 0 reserve_metadata_snap`): `VG-POOL-tpool`,
    /// each `-` inside the VG's and pool's names doubled, as LVM names
    /// every device-mapper device (wyng-backup's `_lvm_meta_snapshot`).
    pub fn pool_dm_name(&self) -> String {
        format!("{}-{}-tpool", dm_escape(&self.vg), dm_escape(&self.pool))
    }

    /// The pool's metadata device, which `thin_delta` reads:
    /// `/dev/mapper/VG-POOL_tmeta`.
    pub fn tmeta_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/dev/mapper/{}-{}_tmeta",
            dm_escape(&self.vg),
            dm_escape(&self.pool)
        ))
    }
}

/// A VG or LV name as a part of a device-mapper name: `-` doubled.
fn dm_escape(name: &str) -> String {
    name.replace('-', "--")
}

/// Asks `lvs` for the identity of thin volume `lv` (`VG/LV` or a path).
pub fn thin_volume(lv: &str) -> Result<ThinVolume> {
    let out = lvm_tool("lvs", &["--reportformat", "json", "-o", FIELDS, lv])?;
    if !out.status.success() {
        return Err(Error::input(format!(
            "{lv} is not an LVM logical volume (lvs: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_lvs(&String::from_utf8_lossy(&out.stdout))
}

/// Runs an LVM or device-mapper tool in the C locale and returns its
/// output; a tool that is not installed is the operator's to fix (exit 2,
/// naming the package).
pub(super) fn lvm_tool(program: &str, args: &[&str]) -> Result<std::process::Output> {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::input(format!(
                    "'{program}' is not installed: an LVM thin volume's change set needs it (apt-get install lvm2)"
                ))
            } else {
                Error::Io(format!("cannot run {program}: {e}"))
            }
        })
}

/// Reads `lvs --reportformat json -o` [`FIELDS`] output about one LV;
/// refuses anything but exactly one thin volume.
pub fn parse_lvs(json: &str) -> Result<ThinVolume> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| Error::Io(format!("lvs printed JSON we cannot read: {e}")))?;
    let reports = v
        .get("report")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Io("lvs printed no \"report\" array".into()))?;
    let rows: Vec<&Value> = reports
        .iter()
        .filter_map(|r| r.get("lv").and_then(Value::as_array))
        .flatten()
        .collect();
    let [row] = rows.as_slice() else {
        return Err(Error::input(format!(
            "lvs reported {} logical volumes where one was asked for",
            rows.len()
        )));
    };
    let field = |name: &str| -> Result<String> {
        match row.get(name) {
            Some(Value::String(s)) => Ok(s.trim().to_string()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Null) => Ok(String::new()),
            _ => Err(Error::Io(format!("lvs reported no {name}"))),
        }
    };
    let (lv, vg, attr) = (field("lv_name")?, field("vg_name")?, field("lv_attr")?);
    let (pool, thin_id) = (field("pool_lv")?, field("thin_id")?);
    let lv_uuid = field("lv_uuid")?;
    // lv_attr: 1st letter the volume type (V: thin volume), 7th the target
    // type (t: thin), lvs(8) NOTES.
    let letters: Vec<char> = attr.chars().collect();
    let thin = letters.first() == Some(&'V') && letters.get(6) == Some(&'t');
    if !thin || pool.is_empty() || thin_id.is_empty() {
        return Err(Error::input(format!(
            "{vg}/{lv} is not an LVM thin volume (attributes '{attr}', pool '{pool}')"
        )));
    }
    let thin_id = thin_id
        .parse()
        .map_err(|_| Error::Io(format!("lvs reported thin_id '{thin_id}' for {vg}/{lv}")))?;
    if lv.is_empty() || vg.is_empty() || lv_uuid.is_empty() {
        return Err(Error::Io(format!(
            "lvs left out the name, group or UUID of {vg}/{lv}"
        )));
    }
    Ok(ThinVolume {
        lv,
        vg,
        lv_uuid,
        pool,
        thin_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped as lvmreport(7) shows `--reportformat json` (every value a
    /// string), with a thin snapshot's attributes as lvmthin(7) shows them.
    const THIN_SNAP: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"thin1s1", "vg_name":"vg-data", "lv_uuid":"Y4Ynpq-2yoj-Xbm4-9UZf-kPbn-q4OV-0FGGlZ", "pool_lv":"pool-0", "thin_id":"7", "lv_attr":"Vwi---tz-k"}
              ]
          }
      ]
  }
"#;

    #[test]
    fn a_thin_volume_gives_pool_id_and_uuid() {
        let t = parse_lvs(THIN_SNAP).unwrap();
        assert_eq!(
            t,
            ThinVolume {
                lv: "thin1s1".into(),
                vg: "vg-data".into(),
                lv_uuid: "Y4Ynpq-2yoj-Xbm4-9UZf-kPbn-q4OV-0FGGlZ".into(),
                pool: "pool-0".into(),
                thin_id: 7,
            }
        );
        assert_eq!(t.pool_dm_name(), "vg--data-pool--0-tpool");
        assert_eq!(
            t.tmeta_path(),
            PathBuf::from("/dev/mapper/vg--data-pool--0_tmeta")
        );
    }

    #[test]
    fn the_log_report_and_numbers_are_read() {
        // With report/output_format json and the command log in the report
        // (lvmreport(7)), and json_std, which prints numbers as numbers.
        let text = r#"{"report":[{"lv":[{"lv_name":"thin1","vg_name":"vg","lv_uuid":"u",
            "pool_lv":"pool0","thin_id":1,"lv_attr":"Vwi-aotz--"}]}],"log":[]}"#;
        assert_eq!(parse_lvs(text).unwrap().thin_id, 1);
    }

    #[test]
    fn anything_but_one_thin_volume_is_refused() {
        let linear = THIN_SNAP
            .replace("Vwi---tz-k", "-wi-a-----")
            .replace("\"pool-0\"", "\"\"")
            .replace("\"7\"", "\"\"");
        let pool = THIN_SNAP
            .replace("Vwi---tz-k", "twi-aotz--")
            .replace("\"7\"", "\"\"");
        let old_snapshot = THIN_SNAP.replace("Vwi---tz-k", "swi-a-s---");
        for text in [linear, pool, old_snapshot] {
            let e = parse_lvs(&text).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(e.to_string().contains("is not an LVM thin volume"), "{e}");
        }
        let none = r#"{"report":[{"lv":[]}]}"#;
        assert!(parse_lvs(none)
            .unwrap_err()
            .to_string()
            .contains("reported 0"));
        let row = r#"{"lv_name":"a","vg_name":"vg","lv_uuid":"u","pool_lv":"p","thin_id":"1","lv_attr":"Vwi-a-tz--"}"#;
        let two = format!(r#"{{"report":[{{"lv":[{row},{row}]}}]}}"#);
        assert!(parse_lvs(&two)
            .unwrap_err()
            .to_string()
            .contains("reported 2"));
        for bad in [
            "",
            "{}",
            "[]",
            r#"{"report":{}}"#,
            "{\"report\":[{\"lv\":[{}]}]}",
        ] {
            assert!(parse_lvs(bad).is_err(), "{bad}");
        }
        let bad_id = THIN_SNAP.replace("\"7\"", "\"seven\"");
        assert!(parse_lvs(&bad_id)
            .unwrap_err()
            .to_string()
            .contains("thin_id 'seven'"));
    }

    #[test]
    fn without_lvs_the_refusal_names_the_package() {
        if crate::io::freeze::have_tool("lvs") {
            eprintln!("SKIP: lvs is installed; the missing-tool path cannot be shown");
            return;
        }
        let e = thin_volume("vg/thin1").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("apt-get install lvm2"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_text(text in ".{0,200}") {
            let _ = parse_lvs(&text);
        }
    }
}
