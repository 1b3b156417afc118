//! Liveness: the server PINGs every `heartbeat_interval` with a timestamp payload; each PONG is an
//! RTT sample fed to an RFC 6298 estimator (α = 1/8, β = 1/4, RTO = SRTT + max(G, 4·RTTVAR)
//! clamped to [200 ms, 30 s]). A PONG overdue by `dead_rtos` RTOs marks the peer dead.

use std::time::Duration;

/// Clock granularity G of RFC 6298 §2 (our timer tick).
pub const GRANULARITY: Duration = Duration::from_millis(10);
pub const RTO_MIN: Duration = Duration::from_millis(200);
pub const RTO_MAX: Duration = Duration::from_secs(30);
/// RFC 6298 §2.1: RTO before the first sample.
pub const RTO_INITIAL: Duration = Duration::from_secs(1);

/// Smoothed RTT estimator of RFC 6298.
#[derive(Clone, Copy, Debug, Default)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimator {
    /// Feeds one RTT measurement (RFC 6298 §2.2 and §2.3).
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(r);
                // RTTVAR <- (1 - β)·RTTVAR + β·|SRTT - R'|, β = 1/4
                self.rttvar = self.rttvar * 3 / 4 + diff / 4;
                // SRTT <- (1 - α)·SRTT + α·R', α = 1/8
                self.srtt = Some(srtt * 7 / 8 + r / 8);
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// RTO = SRTT + max(G, 4·RTTVAR), clamped to [200 ms, 30 s]; 1 s before any sample.
    pub fn rto(&self) -> Duration {
        match self.srtt {
            None => RTO_INITIAL,
            Some(srtt) => (srtt + GRANULARITY.max(self.rttvar * 4)).clamp(RTO_MIN, RTO_MAX),
        }
    }
}

/// Per-connection heartbeat state, driven by the shard's timer tick.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    pub rtt: RttEstimator,
    /// When the next PING is due (shard clock, µs).
    next_ping_us: u64,
    /// The outstanding PING's send time, if its PONG has not arrived.
    outstanding_us: Option<u64>,
    interval_us: u64,
    dead_rtos: u32,
}

/// What the tick should do for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    Nothing,
    /// Send a PING carrying this timestamp.
    Ping(u64),
    /// The peer missed its PONG by `dead_rtos` RTOs.
    Dead,
}

impl Heartbeat {
    pub fn new(now_us: u64, interval: Duration, dead_rtos: u32) -> Self {
        let interval_us = interval.as_micros() as u64;
        Self {
            rtt: RttEstimator::default(),
            next_ping_us: now_us + interval_us,
            outstanding_us: None,
            interval_us,
            dead_rtos,
        }
    }

    /// Called on every tick.
    pub fn tick(&mut self, now_us: u64) -> Beat {
        if let Some(sent) = self.outstanding_us {
            let deadline = self.rtt.rto().as_micros() as u64 * self.dead_rtos as u64;
            if now_us.saturating_sub(sent) > deadline {
                return Beat::Dead;
            }
            return Beat::Nothing;
        }
        if now_us >= self.next_ping_us {
            self.outstanding_us = Some(now_us);
            self.next_ping_us = now_us + self.interval_us;
            return Beat::Ping(now_us);
        }
        Beat::Nothing
    }

    /// A PONG arrived carrying `payload`; returns the RTT if it answers our outstanding PING.
    pub fn pong(&mut self, payload: &[u8], now_us: u64) -> Option<Duration> {
        let stamp = u64::from_be_bytes(payload.try_into().ok()?);
        if self.outstanding_us != Some(stamp) {
            return None; // unsolicited or stale PONG (RFC 6455 §5.5.3 allows them)
        }
        self.outstanding_us = None;
        let rtt = Duration::from_micros(now_us.saturating_sub(stamp));
        self.rtt.sample(rtt);
        Some(rtt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_sample_sets_srtt_and_half_variance() {
        let mut e = RttEstimator::default();
        assert_eq!(e.rto(), RTO_INITIAL);
        e.sample(100 * MS);
        assert_eq!(e.srtt(), Some(100 * MS));
        assert_eq!(e.rttvar(), 50 * MS);
        // 100 + max(10, 200) = 300 ms
        assert_eq!(e.rto(), 300 * MS);
    }

    #[test]
    fn later_samples_follow_alpha_and_beta() {
        let mut e = RttEstimator::default();
        e.sample(100 * MS);
        e.sample(200 * MS);
        // RTTVAR = 3/4·50 + 1/4·|100-200| = 62.5 ms; SRTT = 7/8·100 + 1/8·200 = 112.5 ms
        assert_eq!(e.rttvar(), Duration::from_micros(62_500));
        assert_eq!(e.srtt(), Some(Duration::from_micros(112_500)));
        assert_eq!(e.rto(), Duration::from_micros(112_500 + 250_000));
    }

    #[test]
    fn rto_is_clamped() {
        let mut e = RttEstimator::default();
        for _ in 0..50 {
            e.sample(MS / 10);
        }
        assert_eq!(e.rto(), RTO_MIN);
        let mut e = RttEstimator::default();
        e.sample(Duration::from_secs(40));
        assert_eq!(e.rto(), RTO_MAX);
    }

    #[test]
    fn missing_pong_is_dead_after_several_rtos() {
        let mut h = Heartbeat::new(0, Duration::from_secs(15), 4);
        assert_eq!(h.tick(1_000_000), Beat::Nothing);
        let Beat::Ping(stamp) = h.tick(15_000_000) else {
            panic!("ping due")
        };
        // RTO is 1 s before any sample: dead after 4 s without PONG.
        assert_eq!(h.tick(stamp + 3_900_000), Beat::Nothing);
        assert_eq!(h.tick(stamp + 4_100_000), Beat::Dead);
    }

    #[test]
    fn pong_answers_only_the_outstanding_ping() {
        let mut h = Heartbeat::new(0, Duration::from_millis(100), 4);
        let Beat::Ping(stamp) = h.tick(100_000) else {
            panic!("ping due")
        };
        assert_eq!(h.pong(&(stamp + 1).to_be_bytes(), 120_000), None);
        assert_eq!(h.pong(b"junk", 120_000), None);
        assert_eq!(
            h.pong(&stamp.to_be_bytes(), 130_000),
            Some(Duration::from_millis(30))
        );
        assert_eq!(h.rtt.srtt(), Some(Duration::from_millis(30)));
        assert_eq!(
            h.tick(150_000),
            Beat::Nothing,
            "next ping waits an interval"
        );
    }
}
