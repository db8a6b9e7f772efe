//! Block devices: loop devices as source and target, and a mounted target.
//! These need root and losetup ([`need_root`]): without them they print
//! SKIP and return by hand, and fail under `CI=true`.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::harness::*;

/// A frozen filesystem (`fsfreeze -f`); thawed on drop.
struct Freeze {
    at: PathBuf,
}

impl Freeze {
    fn new(at: &Path) -> Freeze {
        run_tool("fsfreeze", &["-f", at.to_str().expect("UTF-8 path")]);
        Freeze { at: at.to_owned() }
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.at)
            .status();
    }
}

/// Loop device to loop device: a full pass, then a delta pass after
/// scattered writes through the source device. The target device is larger
/// than the source; its first `size` bytes must equal the source.
#[test]
fn loop_device_to_loop_device() {
    if !need_root("loop_device_to_loop_device", &["losetup"]) {
        return;
    }
    let s = Setup::new();
    let mut rng = Rng::new(21);
    let size = 32 * MIB;
    let src_backing = s.path("src-backing.img");
    let dst_backing = s.path("dst-backing.img");
    write_random_file(&src_backing, size, &mut rng);
    write_random_file(&dst_backing, 40 * MIB, &mut rng);
    let src = Loop::attach(&src_backing);
    let dst = Loop::attach(&dst_backing);

    let rx = s.start_receiver(&[("disk", &dst.dev)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("disk");

    let p1 = tx.sync(&src.dev, &dest, &[]);
    p1.assert_pass(1, size, CHUNK);
    assert_eq!(p1.changed_chunks(), chunk_count(size, CHUNK));
    assert_same_prefix(&src.dev, &dst.dev, size);
    assert_eq!(hash_prefix(&src.dev, size), hash_prefix(&dst.dev, size));

    // Users write to the source device (scatter_writes fsyncs the device).
    let touched = scatter_writes(&src.dev, size, 60, CHUNK, &mut rng);
    let p2 = tx.sync(&src.dev, &dest, &[]);
    p2.assert_pass(2, size, CHUNK);
    assert_eq!(
        p2.changed_chunks(),
        touched.len() as u64,
        "scattered writes through the source device touched {} chunks",
        touched.len()
    );
    assert_same_prefix(&src.dev, &dst.dev, size);
    assert_eq!(hash_prefix(&src.dev, size), hash_prefix(&dst.dev, size));
    drop(rx);
}

/// A target block device with a mounted filesystem is refused, and its bytes
/// are left as they were.
#[test]
fn mounted_loop_target_refused() {
    if !need_root(
        "mounted_loop_target_refused",
        &["losetup", "mkfs.ext4", "mount", "umount", "fsfreeze"],
    ) {
        return;
    }
    let s = Setup::new();
    let mut rng = Rng::new(22);
    let size = 32 * MIB;
    let backing = s.path("fs-backing.img");
    File::create(&backing).unwrap().set_len(size).unwrap();
    let dev = Loop::attach(&backing);
    run_tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            dev.dev.to_str().unwrap(),
        ],
    );
    let mnt = s.new_dir("mnt");
    let mount = Mount::mount(&dev.dev, &mnt, "defaults");
    std::fs::write(mnt.join("payroll.db"), rng.bytes(100_000)).unwrap();
    // Freeze the filesystem so that ext4's own writeback cannot change the
    // device while it stays mounted: any change is then nightpass's.
    let frozen = Freeze::new(&mnt);
    let before = chunk_hashes(&dev.dev, size);

    // A mounted device cannot be exported: serve refuses it when it starts
    // (exit 2), not at the first session of the night.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nightpass"))
        .args(["serve", "--listen", "127.0.0.1:0", "--identity"])
        .arg(&s.receiver_id)
        .arg("--state-dir")
        .arg(s.new_dir("receiver-state-mounted"))
        .arg("--volume")
        .arg(format!("disk={}", dev.dev.display()))
        .args(["--allow", &s.sender_fp])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    let after = chunk_hashes(&dev.dev, size);
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(
        changed.is_empty(),
        "a refused export changed the mounted device in chunks {changed:?}"
    );
    drop(frozen);
    drop(mount);
}

/// BLAKE3 of each whole `CHUNK` of the first `len` bytes of `path`.
fn chunk_hashes(path: &Path, len: u64) -> Vec<blake3::Hash> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    (0..len / CHUNK)
        .map(|i| {
            f.read_exact_at(&mut buf, i * CHUNK).unwrap();
            blake3::hash(&buf)
        })
        .collect()
}
