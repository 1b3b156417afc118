//! SIGTERM / SIGINT / SIGHUP: blocked in every thread and taken by one signal thread with
//! `sigwait`. SIGTERM and SIGINT flip the shared shutdown flag (shards notice it on their next
//! tick); SIGHUP reloads the TLS certificate and ticket keys.

use std::sync::Arc;

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGTERM/SIGINT/SIGHUP in the calling thread; threads spawned afterwards inherit the mask.
/// Call first thing in `main`.
pub fn block_signals() {
    let set = signal_set();
    // SAFETY: pthread_sigmask with a valid, initialised set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Spawns the thread that waits for signals: SIGHUP calls `reload`; SIGTERM/SIGINT call `flag`,
/// and a second one exits at once.
pub fn watch(flag: Arc<dyn Fn() + Send + Sync>, reload: Arc<dyn Fn() + Send + Sync>) {
    let span = tracing::Span::current();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let _in = span.entered();
            let set = signal_set();
            let mut first = true;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait on a valid set that is blocked in every thread.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                if sig == libc::SIGHUP {
                    reload();
                    continue;
                }
                if !first {
                    eprintln!("second signal: exiting now");
                    std::process::exit(130);
                }
                first = false;
                tracing::info!(signal = sig, "shutting down: no new connections, draining");
                flag();
            }
        });
}
