//! The wall clock, as every layer reads it: milliseconds since the Unix epoch.
//!
//! It sits below everything else so that the store, the tools and the assistant read the same
//! clock without importing each other. The office's local time (offsets, days) is `schedule`'s.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_the_product_existed_and_moves_forward() {
        let a = super::now_ms();
        // 2024-01-01T00:00:00Z: a clock reading before that is not this machine's clock.
        assert!(a > 1_704_067_200_000, "{a}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(super::now_ms() >= a + 5);
    }
}
