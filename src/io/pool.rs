//! The process's one pool of hashing threads, shared by every scan.
//!
//! A scan ([`crate::io::hash::scan`]) hands its blocks to this pool as
//! jobs instead of starting threads of its own, so that volumes scanned at
//! once (the volumes of a plan run, a receiver's verify sessions) share the
//! cores: one thread per core in all, taking jobs first come, first
//! served. A scan keeps at most a few jobs queued or running at a time (its
//! [`Tokens`]), so none can crowd the others out. A job must not block on
//! anything but the kernel: what it produces goes into a channel with room
//! reserved for it by its token.
//!
//! Owns the threads and the queue; knows nothing of volumes or hashes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex, OnceLock};

/// A unit of work for the pool.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// A pool of threads taking jobs from one queue.
pub struct Pool {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    threads: usize,
    /// Threads that did start: with none, jobs run where they are submitted.
    started: AtomicUsize,
}

impl Pool {
    /// The process's pool: one thread per core, started at first use.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::start(crate::io::hash::worker_count(0)))
    }

    /// Starts a pool of `threads` threads that lives as long as the process.
    pub fn start(threads: usize) -> &'static Pool {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            threads: threads.max(1),
            started: AtomicUsize::new(0),
        }));
        for i in 0..pool.threads {
            let spawned = std::thread::Builder::new()
                .name(format!("nightpass-hash-{i}"))
                .spawn(move || pool.serve());
            if spawned.is_ok() {
                pool.started.fetch_add(1, Ordering::Relaxed);
            }
        }
        pool
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `job`; a thread of the pool runs it.
    pub fn submit(&self, job: Job) {
        if self.started.load(Ordering::Relaxed) == 0 {
            // Not one thread could start: run it here.
            job();
            return;
        }
        self.queue.lock().expect("not poisoned").push_back(job);
        self.ready.notify_one();
    }

    fn serve(&self) {
        loop {
            let job = {
                let mut q = self.queue.lock().expect("not poisoned");
                loop {
                    if let Some(j) = q.pop_front() {
                        break j;
                    }
                    q = self.ready.wait(q).expect("not poisoned");
                }
            };
            job();
        }
    }
}

/// A scan's allowance of jobs in flight: `n` tokens, each taken before a
/// job is submitted and given back when what the job produced is dropped
/// by its consumer ([`Token`]).
pub struct Tokens {
    back: SyncSender<()>,
    free: Receiver<()>,
}

impl Tokens {
    /// `n` tokens (at least one).
    pub fn new(n: usize) -> Tokens {
        let n = n.max(1);
        let (back, free) = sync_channel(n);
        for _ in 0..n {
            let _ = back.send(());
        }
        Tokens { back, free }
    }

    /// Waits for a free token.
    pub fn take(&self) -> Token {
        // `self` holds a sender: the channel cannot close while we wait.
        let _ = self.free.recv();
        Token(Some(self.back.clone()))
    }
}

/// A token taken; given back on drop.
pub struct Token(Option<SyncSender<()>>);

impl Drop for Token {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            // Never blocks: there are never more tokens than room.
            let _ = b.try_send(());
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token")
    }
}

/// Counts a scan's jobs in flight, so that its end can wait for all of
/// them.
#[derive(Default)]
pub struct InFlight {
    n: Mutex<usize>,
    zero: Condvar,
}

impl InFlight {
    /// One more job in flight.
    pub fn start(&self) {
        *self.n.lock().expect("not poisoned") += 1;
    }

    /// A job ended.
    pub fn end(&self) {
        let mut n = self.n.lock().expect("not poisoned");
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.zero.notify_all();
        }
    }

    /// Waits until no job is in flight.
    pub fn wait_idle(&self) {
        let mut n = self.n.lock().expect("not poisoned");
        while *n > 0 {
            n = self.zero.wait(n).expect("not poisoned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn the_pool_runs_at_most_its_threads_at_once_and_every_job() {
        let pool = Pool::start(2);
        let (busy, most, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(InFlight::default()),
        );
        for _ in 0..40 {
            let (busy, most, done) = (busy.clone(), most.clone(), done.clone());
            done.start();
            pool.submit(Box::new(move || {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(300));
                busy.fetch_sub(1, Ordering::SeqCst);
                done.end();
            }));
        }
        done.wait_idle();
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn tokens_come_back_when_dropped() {
        let t = Tokens::new(2);
        let (a, b) = (t.take(), t.take());
        assert!(t.free.try_recv().is_err(), "only two tokens");
        drop(a);
        let c = t.take();
        drop((b, c));
        let _two = (t.take(), t.take());
    }
}
