//! Refused connections, kept in bounded memory: the newest few with their reasons, and a
//! count of all. A flood of bad hellos costs a counter, not a growing list or log.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Refusals kept with their text.
const KEPT: usize = 100;
/// Longest text kept per refusal.
const LONGEST: usize = 512;
/// Refusals logged per window; the rest are counted and summed up in the next line logged.
const LOGGED_PER_WINDOW: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(crate) struct RefusalLog {
    recent: VecDeque<String>,
    total: u64,
    window: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    /// Records a refusal of a connection from `peer`, logging it unless too many came lately.
    pub(crate) fn record(&mut self, what: &str, peer: SocketAddr, reason: &str) {
        self.total += 1;
        let mut text = format!("{peer}: {reason}");
        if text.len() > LONGEST {
            let mut end = LONGEST;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        if self.window.is_none_or(|w| w.elapsed() >= WINDOW) {
            self.window = Some(Instant::now());
            self.logged = 0;
        }
        if self.logged < LOGGED_PER_WINDOW {
            self.logged += 1;
            let more = std::mem::take(&mut self.unlogged);
            if more > 0 {
                tracing::warn!("{what} refused a connection from {text} ({more} more refusals not shown)");
            } else {
                tracing::warn!("{what} refused a connection from {text}");
            }
        } else {
            self.unlogged += 1;
        }
        if self.recent.len() == KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(text);
    }

    /// The newest refusals, oldest first.
    pub(crate) fn recent(&self) -> Vec<String> {
        self.recent.iter().cloned().collect()
    }

    /// All refusals so far.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_stays_bounded_and_the_count_is_exact() {
        let mut log = RefusalLog::default();
        let peer = SocketAddr::from(([10, 0, 0, 1], 9));
        for i in 0..5000 {
            log.record("test", peer, &format!("{i} {}", "x".repeat(64 * 1024)));
        }
        assert_eq!(log.total(), 5000);
        let recent = log.recent();
        assert_eq!(recent.len(), KEPT);
        assert!(recent.iter().all(|r| r.len() <= LONGEST + '…'.len_utf8()));
        assert!(recent.last().unwrap().contains("4999"));
    }
}
