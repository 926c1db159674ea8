//! Time for identity decisions: an injectable clock and the persisted time floor that keeps a
//! box whose clock fell back to 1970 (no RTC, no NTP yet) from issuing certificates.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Error;

/// The source of "now" for identity. Tests inject their own.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// When this binary was built (from `SOURCE_DATE_EPOCH` or the build machine's clock): no
/// correct clock can be earlier.
pub fn build_time() -> SystemTime {
    let secs: u64 = env!("MESHKEEP_BUILD_UNIX_TIME").parse().unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The floor is written at most this often, to spare flash.
const PERSIST_EVERY: Duration = Duration::from_secs(3600);

/// The latest time this box has reason to trust, persisted across reboots.
#[derive(Debug)]
pub struct TimeFloor {
    path: PathBuf,
    floor: SystemTime,
    persisted: SystemTime,
}

impl TimeFloor {
    /// Loads the floor: the later of the build time and the persisted value.
    pub fn load(path: &Path) -> Self {
        let persisted = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs));
        Self { path: path.to_owned(), floor: persisted.max(build_time()), persisted }
    }

    pub fn floor(&self) -> SystemTime {
        self.floor
    }

    /// Raises the floor to a time known to have passed (an observed sane clock, an issuer's
    /// start of validity).
    pub fn raise(&mut self, to: SystemTime) {
        self.floor = self.floor.max(to);
    }

    /// Checks the clock; a sane clock raises the floor (and persists it now and then).
    pub fn check(&mut self, now: SystemTime) -> Result<(), Error> {
        if now < self.floor {
            return Err(Error::ClockBehind { now, floor: self.floor });
        }
        self.floor = now;
        if now.duration_since(self.persisted).unwrap_or_default() >= PERSIST_EVERY {
            self.persist();
        }
        Ok(())
    }

    /// Writes the floor to disk (also at shutdown).
    pub fn persist(&mut self) {
        let secs = self.floor.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        match super::files::write_atomic(&self.path, format!("{secs}\n").as_bytes(), 0o644) {
            Ok(()) => self.persisted = self.floor,
            Err(e) => tracing::warn!(error = %e, "cannot persist the time floor"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_behind_the_floor_is_refused_and_a_sane_one_raises_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("time-floor");
        let mut floor = TimeFloor::load(&path);
        assert!(floor.floor() >= build_time());
        let err = floor.check(UNIX_EPOCH + Duration::from_secs(86400)).unwrap_err();
        assert!(err.to_string().contains("1970-01-02"), "{err}");

        let later = build_time() + Duration::from_secs(10 * 86400);
        floor.check(later).expect("sane clock");
        floor.persist();
        let reloaded = TimeFloor::load(&path);
        assert_eq!(reloaded.floor(), later, "the floor survives a restart");
        assert!(reloaded.floor() > build_time());
    }
}
