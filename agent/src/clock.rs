//! The wall clock, as every layer reads it: milliseconds since the Unix epoch.
//!
//! It sits below everything else so that the store, the tools and the assistant read the same
//! clock without importing each other. The office's local time (offsets, rules) is `schedule`'s.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Now in UTC as a receipt or a report shows it: `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    utc_text(now_ms())
}

fn utc_text(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::schedule::rule::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem / 60 % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_is_civil_time() {
        assert_eq!(super::utc_text(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc_text(1_795_618_800_000), "2026-11-25 15:00 UTC");
        assert_eq!(super::utc_text(-60_000), "1969-12-31 23:59 UTC");
    }

    #[test]
    fn now_is_after_the_product_existed_and_moves_forward() {
        let a = super::now_ms();
        // 2024-01-01T00:00:00Z: a clock reading before that is not this machine's clock.
        assert!(a > 1_704_067_200_000, "{a}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(super::now_ms() >= a + 5);
    }
}
