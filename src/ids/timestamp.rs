//! `Timestamp`: milliseconds since the Unix epoch. Time enters the sans-IO layers only as a
//! parameter of this type, so tests inject it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Debug,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Self(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// `YYYY-MM-DD HH:MM:SS UTC`, for people reading CLI output and logs.
    pub fn to_utc_string(self) -> String {
        let secs = self.0 / 1000;
        let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    /// How long after `earlier` this is (zero if it is not later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates_including_leap_days() {
        assert_eq!(
            Timestamp::from_millis(0).to_utc_string(),
            "1970-01-01 00:00:00 UTC"
        );
        assert_eq!(
            Timestamp::from_millis(951_782_400_000).to_utc_string(),
            "2000-02-29 00:00:00 UTC"
        );
        assert_eq!(
            Timestamp::from_millis(1_795_973_206_632).to_utc_string(),
            "2026-11-29 17:26:46 UTC"
        );
    }
}
