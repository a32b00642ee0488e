//! Time arithmetic shared by the quota and the answer clocks: the wall clock in Unix
//! seconds (quota windows are aligned to the epoch), `resetsAt`'s RFC 3339 form, and a
//! saturating `Instant` sum (a setting absurdly large means "never", not a panic).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// `t + d`, saturating to about 30 years ahead instead of panicking on absurd settings.
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);
    t.checked_add(d).unwrap_or_else(|| t + FAR)
}

/// Seconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp such as `2026-11-24T00:00:00Z`, the
/// form of the `resetsAt` field.
pub(crate) fn rfc3339(unix_secs: u64) -> String {
    let (year, month, day) = civil_from_days(unix_secs / 86_400);
    let secs = unix_secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
///
/// Counting years from 1 March puts the leap day at the end of the year, so the month
/// lengths form a fixed pattern and the calendar repeats exactly every 400 years (an "era"
/// of 146 097 days); the year within an era then follows from the 4/100/400 leap rules.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    // Remove the leap days that precede this day in its era, then divide by 365.
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: lengths 31,30,31,30,31 repeat, which 153 days / 5 months encodes.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (94_694_399, "1972-12-31T23:59:59Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_709_210_096, "2024-02-29T12:34:56Z"),
            (1_795_478_400, "2026-11-24T00:00:00Z"),
            (2_147_483_648, "2038-01-19T03:14:08Z"),
            (4_107_456_000, "2100-02-28T00:00:00Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(secs), text, "{secs}");
        }
    }

    #[test]
    fn later_saturates() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }
}
