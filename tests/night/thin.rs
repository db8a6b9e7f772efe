//! LVM thin change sets (`nightpass::io::thin`) against Debian's
//! thin-provisioning-tools: pool metadata written from XML by
//! `thin_restore` into a file, read back by the real `thin_delta` through
//! our runner and parser. (This kernel has no device-mapper, so no live
//! pool.) Without the tools these print SKIP and return by hand, and fail
//! under `CI=true`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nightpass::io::thin;

use crate::harness::*;

/// The tools these tests need.
const TOOLS: [&str; 2] = ["thin_restore", "thin_delta"];

fn have_tools(test: &str) -> bool {
    match TOOLS.iter().find(|t| !have_tool(t)) {
        Some(t) => skip(
            test,
            &format!("needs '{t}' (apt-get install thin-provisioning-tools)"),
        ),
        None => true,
    }
}

/// One thin device: virtual block → data block.
type Mappings = BTreeMap<u64, u64>;

/// Pool metadata XML (thin_dump's format, which thin_restore reads) with
/// data blocks of `sectors` sectors and the given thin devices.
fn pool_xml(sectors: u64, devices: &[(u64, &Mappings)]) -> String {
    let mut s = format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"2\" \
         data_block_size=\"{sectors}\" nr_data_blocks=\"4096\">\n"
    );
    for (id, maps) in devices {
        s += &format!(
            "  <device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"0\" creation_time=\"0\" snap_time=\"1\">\n",
            maps.len()
        );
        for (v, d) in maps.iter() {
            s += &format!(
                "    <single_mapping origin_block=\"{v}\" data_block=\"{d}\" time=\"0\"/>\n"
            );
        }
        s += "  </device>\n";
    }
    s + "</superblock>\n"
}

/// Restores `xml` into a 4 MiB metadata file (thin_restore writes into a
/// preallocated file, thin_restore(8)) and returns its path.
fn restore(dir: &Path, xml: &str) -> PathBuf {
    let input = dir.join("pool.xml");
    let meta = dir.join("pool.meta");
    std::fs::write(&input, xml).unwrap();
    run_tool("truncate", &["-s", "4M", meta.to_str().unwrap()]);
    run_tool(
        "thin_restore",
        &["-i", input.to_str().unwrap(), "-o", meta.to_str().unwrap()],
    );
    meta
}

/// The 4 KiB blocks of every virtual block not mapped alike by `a` and `b`.
fn expected(sectors: u64, a: &Mappings, b: &Mappings) -> BTreeSet<u64> {
    let per = sectors * 512 / 4096;
    let all: BTreeSet<u64> = a.keys().chain(b.keys()).copied().collect();
    all.into_iter()
        .filter(|v| a.get(v) != b.get(v))
        .flat_map(|v| v * per..(v + 1) * per)
        .collect()
}

fn blocks(runs: &nightpass_proto::changes::BlockRuns) -> BTreeSet<u64> {
    runs.runs().flatten().collect()
}

/// An origin and its snapshot: shared 0..4 and 10, the snapshot remaps
/// 2..4 (different), 20 only in the origin (left_only), 30 only in the
/// snapshot (right_only).
fn origin_and_snapshot() -> (Mappings, Mappings) {
    let origin: Mappings = [(0, 0), (1, 1), (2, 2), (3, 3), (10, 10), (20, 20)].into();
    let snap: Mappings = [(0, 0), (1, 1), (2, 100), (3, 101), (10, 10), (30, 30)].into();
    (origin, snap)
}

#[test]
fn thin_delta_gives_exact_blocks_at_64k_and_1m() {
    if !have_tools("thin_delta_gives_exact_blocks_at_64k_and_1m") {
        return;
    }
    let (origin, snap) = origin_and_snapshot();
    for (sectors, per) in [(128u64, 16u64), (2048, 256)] {
        let dir = scratch();
        let meta = restore(dir.path(), &pool_xml(sectors, &[(1, &origin), (2, &snap)]));
        let got = blocks(&thin::thin_delta(&meta, 1, 2).expect("thin_delta"));
        let want: BTreeSet<u64> = (2 * per..4 * per)
            .chain(20 * per..21 * per)
            .chain(30 * per..31 * per)
            .collect();
        assert_eq!(got, want, "data blocks of {sectors} sectors");
        assert_eq!(got, expected(sectors, &origin, &snap));
        // The other way round, left_only and right_only swap: the same set.
        let back = blocks(&thin::thin_delta(&meta, 2, 1).expect("thin_delta"));
        assert_eq!(back, want);
    }
}

#[test]
fn thin_delta_of_unchanged_snapshots_is_empty() {
    if !have_tools("thin_delta_of_unchanged_snapshots_is_empty") {
        return;
    }
    let dir = scratch();
    let (origin, _) = origin_and_snapshot();
    let none = Mappings::new();
    let xml = pool_xml(128, &[(1, &origin), (2, &origin), (3, &none), (4, &none)]);
    let meta = restore(dir.path(), &xml);
    assert!(thin::thin_delta(&meta, 1, 2).unwrap().is_empty());
    assert!(thin::thin_delta(&meta, 3, 4).unwrap().is_empty());
    // Everything mapped on one side only is changed.
    let all = blocks(&thin::thin_delta(&meta, 1, 3).unwrap());
    assert_eq!(all, expected(128, &origin, &none));
    assert_eq!(all.len(), 6 * 16);
}

#[test]
fn thin_delta_agrees_with_random_pools() {
    if !have_tools("thin_delta_agrees_with_random_pools") {
        return;
    }
    let mut rng = Rng::new(15);
    for round in 0..6 {
        let sectors = [128u64, 256, 2048][round % 3];
        // An origin over 300 virtual blocks, then a snapshot that keeps,
        // remaps, drops or newly maps each.
        let mut origin = Mappings::new();
        let mut snap = Mappings::new();
        let mut next_data = 0;
        for v in 0..300 {
            if rng.below(3) > 0 {
                origin.insert(v, next_data);
                next_data += 1;
            }
        }
        for v in 0..300 {
            match (origin.get(&v), rng.below(4)) {
                (Some(&d), 0 | 1) => drop(snap.insert(v, d)),
                (Some(_), 2) | (None, 0) => {
                    snap.insert(v, next_data);
                    next_data += 1;
                }
                _ => {}
            }
        }
        let dir = scratch();
        let meta = restore(dir.path(), &pool_xml(sectors, &[(5, &origin), (9, &snap)]));
        let got = blocks(&thin::thin_delta(&meta, 5, 9).expect("thin_delta"));
        assert_eq!(got, expected(sectors, &origin, &snap), "round {round}");
    }
}

#[test]
fn thin_delta_failures_are_clear_errors() {
    if !have_tools("thin_delta_failures_are_clear_errors") {
        return;
    }
    let dir = scratch();
    let (origin, snap) = origin_and_snapshot();
    let meta = restore(dir.path(), &pool_xml(128, &[(1, &origin), (2, &snap)]));
    // A thin id the pool does not have (a snapshot removed since).
    let e = thin::thin_delta(&meta, 1, 9).unwrap_err();
    assert_eq!(e.exit_code(), 3);
    assert!(
        e.to_string().contains("--snap2 9") && e.to_string().contains("failed"),
        "{e}"
    );
    // A live pool's way, on metadata without a reserved metadata snapshot.
    let e = thin::thin_delta_live(&meta, 1, 2).unwrap_err().to_string();
    assert!(e.contains("--metadata-snap") && e.contains("failed"), "{e}");
    // Not metadata at all.
    let junk = dir.path().join("junk");
    run_tool("truncate", &["-s", "4M", junk.to_str().unwrap()]);
    let e = thin::thin_delta(&junk, 1, 2).unwrap_err().to_string();
    assert!(e.contains("failed"), "{e}");
}

#[test]
fn thin_delta_of_a_fragmented_pool_is_read_whole() {
    if !have_tools("thin_delta_of_a_fragmented_pool_is_read_whole") {
        return;
    }
    // 60000 virtual blocks, every other one remapped in the snapshot: the
    // tool prints 60000 alternating runs.
    let n = 60_000u64;
    let origin: Mappings = (0..n).map(|v| (v, v)).collect();
    let snap: Mappings = (0..n)
        .map(|v| (v, if v % 2 == 0 { v } else { n + v }))
        .collect();
    let dir = scratch();
    let xml = pool_xml(128, &[(1, &origin), (2, &snap)])
        .replace("nr_data_blocks=\"4096\"", "nr_data_blocks=\"200000\"");
    let input = dir.path().join("pool.xml");
    let meta = dir.path().join("pool.meta");
    std::fs::write(&input, xml).unwrap();
    run_tool("truncate", &["-s", "16M", meta.to_str().unwrap()]);
    run_tool(
        "thin_restore",
        &["-i", input.to_str().unwrap(), "-o", meta.to_str().unwrap()],
    );
    let t = std::time::Instant::now();
    let runs = thin::thin_delta(&meta, 1, 2).expect("thin_delta");
    eprintln!(
        "thin_delta of {n} alternating data blocks: {} runs read in {:?}",
        runs.run_count(),
        t.elapsed()
    );
    assert_eq!(runs.run_count() as u64, n / 2);
    assert_eq!(runs.blocks(), n / 2 * 16);
    assert!(runs.contains(16) && !runs.contains(0) && runs.contains((n - 1) * 16));
}
