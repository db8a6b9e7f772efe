//! The kernel's record of block writes: a private tracefs instance that
//! delivers every non-read block operation of given devices, with any loss
//! made visible.
//!
//! Owns the tracing instance (`/sys/kernel/tracing/instances/nightpass-<pid>-<random>`:
//! its creation, filters, events, per-CPU readers and removal), the ring
//! buffer's page format ([`page`]), the events' formats ([`mod@format`]) and the
//! tracefs files ([`tracefs`]). Must not know chunks, records, epochs or
//! passes: what an event means for a volume belongs to `nightpass track`.
//!
//! ## Why tracefs
//! The blktrace relay files are closed on this kernel (lockdown: opening
//! debugfs `block/<dev>/trace0` fails with EPERM), and an eBPF recorder
//! would need a BPF toolchain at build time. A tracefs instance is ours
//! alone: other tracing users neither see nor disturb it, and as long as
//! our per-CPU files are open nobody can remove it (`rmdir` says EBUSY).
//!
//! ## What is traced
//! `block:block_bio_queue` ([`Phase::Queued`]) fires in
//! `submit_bio_noacct_nocheck` (block/blk-core.c) the first time a bio is
//! submitted, for every kind of device; the completion events
//! ([`Phase::Completed`]) are `block:block_rq_complete` for request-based
//! devices (fired from `blk_update_request`, for the bytes completed) and
//! `block:block_bio_complete` for bio-based ones (fired from `bio_endio`
//! for a bio whose queueing was traced). Both are enabled, each with the
//! same kernel filter: `(dev == A || dev == B) && nr_sector > 0 &&
//! !(rwbs ~ "R*")`, so reads and flushes never reach the buffer. Checked
//! here (kernel 6.18):
//! - **A loop device fires `block_rq_complete`** (loop is request-based,
//!   blk-mq), and never `block_bio_complete`; its completion often runs on
//!   another CPU than the submission (ksoftirqd).
//! - **Operations' letters** (`rwbs`): writes `W…`, discards `D…`,
//!   write-zeroes `N…` (this kernel has no letter for it; newer ones may
//!   write `WZ`), flushes `F` with 0 sectors (dropped). See
//!   [`format::op_of`].
//! - **A partition's events carry the whole disk's dev_t, at the disk's
//!   sector**: `submit_bio_noacct` calls `blk_partition_remap` (adds the
//!   partition's start to `bi_sector`) before the tracepoint, and the event
//!   records `bio_dev(bio)`, which is `disk_devt(bio->bi_bdev->bd_disk)`
//!   (include/linux/bio.h), the disk's dev_t. A filter on a partition's
//!   dev_t therefore sees nothing: [`TraceSession::start`] refuses a
//!   partition, and [`partition_of`] gives its disk and start so the caller
//!   traces the disk and subtracts the start. (Not checked by experiment:
//!   this kernel has no partition table parsers, `CONFIG_MSDOS_PARTITION`
//!   and `CONFIG_EFI_PARTITION` are off, so `losetup -P` makes no
//!   partitions.)
//! - **A device-mapper device is traced under its own dev_t**: its bio is
//!   traced in `submit_bio_noacct_nocheck` before `__submit_bio` hands it
//!   to `dm_submit_bio`, which remaps and clones it; `BIO_TRACE_COMPLETION`
//!   marks it so `bio_endio` fires `block_bio_complete` (dm is bio-based).
//!   The clones sent to the lower devices are new bios, traced under the
//!   lower devices' dev_t (not checked by experiment: this kernel has no
//!   device-mapper).
//!
//! ## Loss
//! Each CPU's `stats` counts `overrun` (overwritten before read), `commit
//! overrun` and `dropped events`; a page read with `RB_MISSED_EVENTS` set
//! counts too. [`Health`] sums them: any growth means events were lost.
//!
//! ## Holding a write in flight
//! Between `block_bio_queue` and its completion a write can be held by
//! freezing (`fsfreeze -f`) the filesystem that holds a loop device's
//! backing file: the loop worker blocks, the request waits. blk-throttle
//! (`io.max`) does not hold it there: `submit_bio_noacct` throttles a bio
//! before `submit_bio_noacct_nocheck` traces it, so a throttled write is
//! seen when it is dispatched (still before the device changes).
//!
//! ## Cost (this machine: 2 shared CPUs, load average about 5)
//! `cargo test --release --test night tracefs_figures -- --ignored
//! --nocapture`: 50 000 direct 4 KiB writes at random offsets of a 256 MiB
//! loop device, 7 rounds alternating without and with a session polled by a
//! thread. Medians: the writer's CPU time 0.340 s without, 0.360 s with
//! (ratio 1.06); the whole process's (writer and poller) 0.360 s against
//! 0.370 s (1.03). Wall time is dominated by the other load (0.59 to
//! 3.5 s per round either way). Every round's 100 000 events arrived, none
//! lost, at up to 155 000 events per second (the writer's pace, not the
//! reader's limit); a drain of 200 000 events already in a 64 MiB buffer
//! took 15 ms (over 10 million events per second). A poll wakes at most
//! once per 5 ms ([`TraceSession::poll`] lets events gather), so the poller
//! costs little CPU; a wake-up per event cost more than the writes.
//!
//! ## A process killed by SIGKILL
//! Its instance stays behind (tracefs does not know who made it), tracing
//! into a buffer nobody reads. [`remove_stale_instances`] removes every
//! `nightpass-<pid>-*` whose pid is dead; a tracker calls it when it starts.

pub mod format;
pub mod page;
mod session;
pub mod tracefs;

pub use session::{remove_stale_instances, TraceSession};
pub use tracefs::{partition_of, Partition};

/// One block operation seen by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEvent {
    /// The kernel's dev_t, `MAJOR<<20 | MINOR` (a partition's events carry
    /// its disk's).
    pub dev: u32,
    /// First sector (512 bytes) on `dev`.
    pub sector: u64,
    /// Number of sectors, never 0.
    pub sectors: u32,
    /// What the operation does.
    pub op: Op,
    /// When it was seen.
    pub phase: Phase,
}

/// A non-read block operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A write (`W`).
    Write,
    /// A discard or secure erase (`D`, `DE`).
    Discard,
    /// A write-zeroes (`N` on this kernel, `WZ` on newer ones).
    WriteZeroes,
    /// Any other non-read operation with sectors (zone operations).
    Other,
}

/// When an operation was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Submitted (`block_bio_queue`).
    Queued,
    /// Completed (`block_rq_complete` or `block_bio_complete`).
    Completed,
}

/// What a session has lost so far, and whether it still delivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Sum over CPUs of `overrun`.
    pub overrun: u64,
    /// Sum over CPUs of `commit overrun`.
    pub commit_overrun: u64,
    /// Sum over CPUs of `dropped events`.
    pub dropped: u64,
    /// Pages read with the kernel's missed-events flag.
    pub missed_pages: u64,
    /// The instance's directory still exists.
    pub present: bool,
    /// Its `tracing_on` reads 1.
    pub tracing_on: bool,
    /// Each of its three block events is still enabled.
    pub events_on: bool,
}

impl Health {
    /// Events lost so far, by every counter: any growth breaks a record.
    pub fn lost(&self) -> u64 {
        self.overrun
            .saturating_add(self.commit_overrun)
            .saturating_add(self.dropped)
            .saturating_add(self.missed_pages)
    }

    /// True when nothing was lost and the instance still delivers.
    pub fn unbroken(&self) -> bool {
        self.lost() == 0 && self.present && self.tracing_on && self.events_on
    }
}
