//! The parser on output captured from Debian's thin-provisioning-tools
//! 0.9.0 (`thin_restore` of the XML in each comment, then `thin_delta`),
//! on forms built from random runs, and on arbitrary text.

use super::*;
use proptest::prelude::*;

/// Pool A: data blocks of 128 sectors (64 KiB); thin 1 maps 0..4, 10 and
/// 20; thin 2 shares 0..2 and 10, remaps 2..4 and maps 30.
/// `thin_delta --snap1 1 --snap2 2 meta`:
const CAPTURED_A: &str = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1024">
  <diff left="1" right="2">
    <same begin="0" length="2"/>
    <different begin="2" length="2"/>
    <same begin="10" length="1"/>
    <left_only begin="20" length="1"/>
    <right_only begin="30" length="1"/>
  </diff>
</superblock>
"#;

/// The same with `--verbose`.
const CAPTURED_A_VERBOSE: &str = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1024">
  <diff left="1" right="2">
    <same>
      <range begin="0" data_begin="0" length="2"/>
    </same>
    <different>
      <range begin="2" left_data_begin="2" right_data_begin="100" length="2"/>
    </different>
    <same>
      <range begin="10" data_begin="10" length="1"/>
    </same>
    <left_only>
      <range begin="20" data_begin="20" length="1"/>
    </left_only>
    <right_only>
      <range begin="30" data_begin="30" length="1"/>
    </right_only>
  </diff>
</superblock>
"#;

/// Pool B: data blocks of 2048 sectors (1 MiB); thin 7 maps 0..3, 5 and 8;
/// thin 9 shares 0 and 2, remaps 1 and 5, maps 6 only.
/// `thin_delta --snap1 7 --snap2 9 meta`:
const CAPTURED_B: &str = r#"<superblock uuid="" time="2" transaction="3" data_block_size="2048" nr_data_blocks="4096">
  <diff left="7" right="9">
    <same begin="0" length="1"/>
    <different begin="1" length="1"/>
    <same begin="2" length="1"/>
    <different begin="5" length="1"/>
    <right_only begin="6" length="1"/>
    <left_only begin="8" length="1"/>
  </diff>
</superblock>
"#;

/// Two thins with no mappings, 1 MiB blocks: `thin_delta --snap1 5 --snap2 6`.
const CAPTURED_EMPTY: &str = r#"<superblock uuid="" time="0" transaction="1" data_block_size="2048" nr_data_blocks="100">
  <diff left="5" right="6">
  </diff>
</superblock>
"#;

fn blocks(d: &Delta) -> Vec<u64> {
    d.changed.runs().flatten().collect()
}

#[test]
fn captured_output_gives_every_block_not_same() {
    // 64 KiB data blocks are 16 blocks of 4 KiB.
    let d = parse_delta(CAPTURED_A).unwrap();
    assert_eq!(
        (d.left, d.right, d.data_block_sectors),
        (Some(1), Some(2), 128)
    );
    let want: Vec<u64> = (32..64).chain(320..336).chain(480..496).collect();
    assert_eq!(blocks(&d), want);
    assert_eq!(parse_delta(CAPTURED_A_VERBOSE).unwrap(), d);
}

#[test]
fn captured_output_with_one_mib_blocks() {
    let d = parse_delta(CAPTURED_B).unwrap();
    assert_eq!(d.data_block_sectors, 2048);
    // 256 blocks of 4 KiB per data block: 1, then 5..7, then 8.
    let runs: Vec<_> = d.changed.runs().collect();
    assert_eq!(runs, vec![256..512, 1280..1792, 2048..2304]);
}

#[test]
fn an_empty_diff_is_no_change() {
    let d = parse_delta(CAPTURED_EMPTY).unwrap();
    assert!(d.changed.is_empty());
    assert_eq!((d.left, d.right), (Some(5), Some(6)));
}

#[test]
fn the_newer_tools_forms_are_read() {
    let text = "<?xml version=\"1.0\"?>\n<superblock uuid='x>y' time=\"0\" transaction=\"1\" \
        flags=\"0\" data_block_size=\"128\" nr_data_blocks=\"9\" metadata_snap=\"17\">\n\
        <diff left_root=\"3\" right_root=\"4\">\n<different begin=\"0\" length=\"1\"/>\n\
        </diff>\n</superblock>\n";
    let d = parse_delta(text).unwrap();
    assert_eq!((d.left, d.right), (None, None));
    assert_eq!(d.changed.runs().collect::<Vec<_>>(), vec![0..16]);
}

#[test]
fn output_not_understood_is_refused() {
    let cases = [
        ("", "where <superblock>"),
        (&CAPTURED_A[..CAPTURED_A.len() - 14], "before </superblock>"),
        (&CAPTURED_A[..200], "inside a tag"),
        (
            &CAPTURED_A.replace("</diff>", ""),
            "</superblock> inside <diff>",
        ),
        (
            &CAPTURED_A.replace("left_only", "moved"),
            "<moved> inside <diff>",
        ),
        (
            &CAPTURED_A.replace("\"128\"", "\"0\""),
            "data_block_size of 0",
        ),
        (
            &CAPTURED_A.replace("\"128\"", "\"-1\""),
            "data_block_size=\"-1\"",
        ),
        (
            &CAPTURED_A.replace(" length=\"1\"/>\n    <left", "/>\n    <left"),
            "without length",
        ),
        (
            &CAPTURED_A.replace("begin=\"30\"", "begin=\"3\""),
            "before the end",
        ),
        (
            &CAPTURED_A.replace("begin=\"30\"", "begin=\"18446744073709551615\""),
            "past 2^64",
        ),
        (
            &CAPTURED_A.replace("begin=\"30\"", "begin=\"99999999999999999999\""),
            "past 2^64",
        ),
        (&format!("{CAPTURED_A}<superblock>"), "after </superblock>"),
        (&format!("{CAPTURED_A}junk"), "text outside"),
        (
            &CAPTURED_A_VERBOSE.replace("<range begin=\"20\"", "<same begin=\"20\""),
            "<same> inside <left_only>",
        ),
        (
            &CAPTURED_A.replace("<same begin=\"10\"", "<same begin=\"10\" begin=\"11\""),
            "twice",
        ),
    ];
    for (text, needle) in cases {
        let e = parse_delta(text).expect_err(needle).to_string();
        assert!(e.contains(needle), "{needle:?} not in {e:?}");
        assert!(e.contains("refusing to guess"), "{e}");
    }
}

/// Renders runs as the tool would, in its plain or verbose form.
fn render(sectors: u64, runs: &[(u64, u64, u8)], verbose: bool) -> String {
    const KINDS: [&str; 4] = ["same", "different", "left_only", "right_only"];
    let mut s = format!(
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" data_block_size=\"{sectors}\" nr_data_blocks=\"1\">\n  <diff left=\"1\" right=\"2\">\n"
    );
    for &(begin, length, kind) in runs {
        let k = KINDS[kind as usize % 4];
        if verbose {
            s += &format!("    <{k}>\n      <range begin=\"{begin}\" data_begin=\"7\" length=\"{length}\"/>\n    </{k}>\n");
        } else {
            s += &format!("    <{k} begin=\"{begin}\" length=\"{length}\"/>\n");
        }
    }
    s + "  </diff>\n</superblock>\n"
}

proptest! {
    #[test]
    fn never_panics_on_any_text(text in ".{0,400}") {
        let _ = parse_delta(&text);
    }

    #[test]
    fn never_panics_on_damaged_output(cut in 0usize..400, at in 0usize..400, byte in any::<u8>()) {
        let mut bytes = CAPTURED_A_VERBOSE.as_bytes().to_vec();
        let at = at % bytes.len();
        bytes[at] = byte;
        bytes.truncate(cut.max(1).min(bytes.len()));
        let _ = parse_delta_from(&bytes[..]);
    }

    #[test]
    fn random_runs_give_their_changed_blocks(
        mult in 1u64..16,
        gaps in proptest::collection::vec((0u64..5, 1u64..6, 0u8..4), 0..30),
        verbose in any::<bool>(),
    ) {
        let sectors = 128 * mult;
        let mut runs = Vec::new();
        let mut want = std::collections::BTreeSet::new();
        let mut at = 0;
        for (gap, length, kind) in gaps {
            let begin = at + gap;
            runs.push((begin, length, kind));
            if kind % 4 != 0 {
                let per = sectors / 8;
                want.extend(begin * per..(begin + length) * per);
            }
            at = begin + length;
        }
        let d = parse_delta(&render(sectors, &runs, verbose)).unwrap();
        let got: std::collections::BTreeSet<u64> = d.changed.runs().flatten().collect();
        prop_assert_eq!(got, want);
    }
}
