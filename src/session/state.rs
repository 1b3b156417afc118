//! The connection state machine of SPEC 4: INIT → HANDSHAKING → ACTIVE → GRACEFUL_CLOSING →
//! CLOSED. Transitions only move forward (idempotent when repeated); time spent in each state is
//! added to the shard's metrics on every transition.

use std::cell::Cell;
use std::time::Instant;

use crate::metrics::ShardMetrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConnState {
    Init = 0,
    Handshaking = 1,
    Active = 2,
    GracefulClosing = 3,
    Closed = 4,
}

/// A connection's state and when it entered it. Single-threaded (the shard owns it).
#[derive(Debug)]
pub struct StateMachine {
    state: Cell<ConnState>,
    since: Cell<Instant>,
}

impl StateMachine {
    pub fn new(now: Instant) -> Self {
        Self {
            state: Cell::new(ConnState::Init),
            since: Cell::new(now),
        }
    }

    pub fn get(&self) -> ConnState {
        self.state.get()
    }

    pub fn since(&self) -> Instant {
        self.since.get()
    }

    /// Moves to `to` if it is later in the lifecycle; returns whether a transition happened.
    pub fn advance(&self, to: ConnState, now: Instant, metrics: &ShardMetrics) -> bool {
        let from = self.state.get();
        if to <= from {
            return false;
        }
        let spent = now.saturating_duration_since(self.since.get());
        metrics.state_time_ns[from as usize].add(spent.as_nanos() as u64);
        self.state.set(to);
        self.since.set(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn transitions_only_move_forward_and_count_time() {
        let m = ShardMetrics::default();
        let t0 = Instant::now();
        let s = StateMachine::new(t0);
        assert!(s.advance(ConnState::Handshaking, t0 + Duration::from_millis(1), &m));
        assert!(s.advance(ConnState::Active, t0 + Duration::from_millis(3), &m));
        assert!(
            !s.advance(ConnState::Active, t0 + Duration::from_millis(4), &m),
            "idempotent"
        );
        assert!(
            !s.advance(ConnState::Handshaking, t0 + Duration::from_millis(5), &m),
            "no way back"
        );
        assert!(s.advance(ConnState::Closed, t0 + Duration::from_millis(10), &m));
        assert!(!s.advance(
            ConnState::GracefulClosing,
            t0 + Duration::from_millis(11),
            &m
        ));
        assert_eq!(m.state_time_ns[0].get(), 1_000_000);
        assert_eq!(m.state_time_ns[1].get(), 2_000_000);
        assert_eq!(m.state_time_ns[2].get(), 7_000_000);
        assert_eq!(s.get(), ConnState::Closed);
    }
}
