//! The CPU backend's threads: a fixed team that runs one parallel loop at a time, the calling
//! thread included, with workers that spin between loops instead of sleeping.
//!
//! A decode step is ~120 parallel loops (four matmuls and an attention per layer), each tens to
//! hundreds of microseconds, separated by short serial ops (norms, rope, residual adds) on the
//! calling thread. A work-stealing pool's idle workers go to sleep within those gaps and take a
//! futex wake-up to come back, so part of every small matmul ran on one thread
//! (docs/benchmarks.md: ~58 context switches per decoded token with rayon). Here a worker spins on
//! the loop counter for [`SPIN`] after its last loop, then parks on a condition variable; the
//! next loop wakes parked workers. Tasks of a loop are handed out by one atomic counter, so a
//! slow thread delays a loop by at most one task.
//!
//! One loop at a time: a second thread calling [`Team::for_each`] while a loop runs executes its
//! own loop serially rather than waiting.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

type Job = dyn Fn(usize) + Sync;

struct Inner {
    /// Bumped once per loop; a worker runs a loop when it sees a new value.
    epoch: AtomicUsize,
    /// The current loop's body, lifetime erased: valid while `active` > 0 (see `for_each`).
    job: UnsafeCell<Option<&'static Job>>,
    tasks: AtomicUsize,
    next: AtomicUsize,
    /// Workers that have not yet finished the current loop.
    active: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread that holds `Team::running`, before it publishes the
// loop with a SeqCst bump of `epoch`, and cleared only after every worker has signalled through
// `active` that it no longer reads it.
unsafe impl Sync for Inner {}

pub struct Team {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
    running: Mutex<()>,
}

impl Team {
    /// A team of `threads` threads: the caller of each loop plus `threads - 1` workers (fewer
    /// where threads cannot be spawned: the loops still run, on fewer threads).
    pub fn new(threads: usize) -> Self {
        let inner = Arc::new(Inner {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("seedance-cpu-{i}"))
                    .spawn(move || worker(&inner))
                    .ok()
            })
            .collect();
        Self {
            inner,
            workers,
            running: Mutex::new(()),
        }
    }

    /// Threads that run a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every i in 0..n across the team and returns when all have run.
    pub fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let serial = || (0..n).for_each(f);
        if n <= 1 || self.workers.is_empty() {
            return serial();
        }
        let Ok(_running) = self.running.try_lock() else {
            return serial();
        };
        let inner = &*self.inner;
        // SAFETY: no worker reads `job` now (the previous loop's `active` reached 0), and the
        // reference outlives its use: `Finish` below waits for every worker before `f` is gone,
        // on return and on unwind alike.
        unsafe {
            *inner.job.get() = Some(std::mem::transmute::<
                &(dyn Fn(usize) + Sync + '_),
                &'static Job,
            >(f));
        }
        // A flag left by a loop whose caller unwound first belongs to that loop, not this one.
        inner.panicked.store(false, Relaxed);
        inner.tasks.store(n, Relaxed);
        inner.next.store(0, Relaxed);
        inner.active.store(self.workers.len(), Relaxed);
        inner.epoch.fetch_add(1, SeqCst);
        if inner.sleepers.load(SeqCst) > 0 {
            let _g = inner.park.lock().unwrap_or_else(|e| e.into_inner());
            inner.wake.notify_all();
        }
        struct Finish<'a>(&'a Inner);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                while self.0.active.load(Acquire) != 0 {
                    std::hint::spin_loop();
                }
                // SAFETY: every worker is done with this loop.
                unsafe { *self.0.job.get() = None };
            }
        }
        let finish = Finish(inner);
        run_tasks(inner, f);
        drop(finish);
        if inner.panicked.swap(false, Relaxed) {
            panic!("a CPU backend worker panicked in a parallel loop");
        }
    }
}

fn run_tasks(inner: &Inner, f: &(dyn Fn(usize) + Sync + '_)) {
    let n = inner.tasks.load(Relaxed);
    loop {
        let i = inner.next.fetch_add(1, Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

fn worker(inner: &Inner) {
    let mut seen = 0;
    loop {
        // Wait for the next loop: spin for SPIN, then park.
        let idle = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = inner.epoch.load(SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            if inner.stop.load(Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || idle.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut g = inner.park.lock().unwrap_or_else(|e| e.into_inner());
            inner.sleepers.fetch_add(1, SeqCst);
            while inner.epoch.load(SeqCst) == seen && !inner.stop.load(SeqCst) {
                g = inner.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            inner.sleepers.fetch_sub(1, SeqCst);
        }
        // SAFETY: published before the epoch this worker just saw; valid until it decrements
        // `active` below.
        if let Some(f) = unsafe { *inner.job.get() } {
            if catch_unwind(AssertUnwindSafe(|| run_tasks(inner, f))).is_err() {
                inner.panicked.store(true, Relaxed);
            }
        }
        inner.active.fetch_sub(1, Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.inner.stop.store(true, SeqCst);
        {
            let _g = self.inner.park.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_across_many_loops() {
        let team = Team::new(3);
        for n in [0usize, 1, 2, 7, 100] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                team.for_each(n, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n={n}");
            }
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_loop() {
        let team = Team::new(2);
        std::thread::sleep(SPIN * 3);
        let threads = Mutex::new(std::collections::HashSet::new());
        // Enough slow tasks that the worker takes some once it wakes.
        team.for_each(64, &|_| {
            std::thread::sleep(Duration::from_millis(1));
            threads.lock().unwrap().insert(std::thread::current().id());
        });
        assert_eq!(threads.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_team_goes_on() {
        let team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.for_each(64, &|i| {
                std::thread::sleep(Duration::from_micros(100));
                assert!(i != 40, "task 40");
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        team.for_each(10, &|_| {
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), 10);
    }
}
