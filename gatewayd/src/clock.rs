//! Time as an injected dependency, so pairing windows, expiries and renewals are tested
//! deterministically.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::state::UnixTime;

/// A source of time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Monotonic time, for deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock time, for what is stored and shown.
    fn system_now(&self) -> SystemTime;

    /// Wall-clock time as Unix seconds.
    fn unix_now(&self) -> UnixTime {
        unix_seconds(self.system_now())
    }
}

/// Unix seconds of `t` (negative before 1970).
pub fn unix_seconds(t: SystemTime) -> UnixTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    system_base: SystemTime,
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// Starts at the real "now", wall clock at `unix` seconds.
    pub fn new(unix: u64) -> Self {
        Self {
            base: Instant::now(),
            system_base: UNIX_EPOCH + Duration::from_secs(unix),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves both clocks forward.
    pub fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap_or_else(PoisonError::into_inner) += d;
    }

    fn offset(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.offset()
    }
    fn system_now(&self) -> SystemTime {
        self.system_base + self.offset()
    }
}
