//! Liveness without a clock: how often heartbeats go, and whether a peer that has been
//! silent for so long — as the application saw it, and as the kernel did — is dead.

use std::time::Duration;

use crate::sys::TcpPulse;

/// How often both sides of a connection send heartbeats, and how long a silent peer has
/// before it counts as dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Time between heartbeats.
    pub interval: Duration,
    /// Silence after which the peer is dead.
    pub timeout: Duration,
}

impl Default for Liveness {
    /// 5 s between heartbeats, dead after 60 s of silence: a GC pause, a swapping node or a
    /// busy network does not kill a worker; a hung node is noticed within a minute.
    fn default() -> Self {
        Liveness { interval: Duration::from_secs(5), timeout: Duration::from_secs(60) }
    }
}

/// What is known of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Heard from recently enough.
    Alive,
    /// Silent for this long: at least the timeout.
    Silent(Duration),
    /// It closed the connection (seen by the kernel, whether we read it or not).
    Closed,
}

/// Unread bytes from which a silent peer is presumed blocked by us, not dead: a peer whose
/// data we do not read cannot get its heartbeats through either.
const BACKED_UP: usize = 64 * 1024;

impl Liveness {
    /// Judges a peer last heard `app_silence` ago by the application; `kernel`, for a TCP
    /// connection, is what the kernel knows even while nobody reads it: data that arrived
    /// unread is a sign of life, and so is a receive queue we are too busy to empty.
    pub fn judge(&self, app_silence: Duration, kernel: Option<TcpPulse>) -> Health {
        let silence = match kernel {
            Some(k) if k.closed => return Health::Closed,
            Some(k) if k.unread >= BACKED_UP => Duration::ZERO,
            Some(k) => app_silence.min(k.since_data),
            None => app_silence,
        };
        if silence >= self.timeout { Health::Silent(silence) } else { Health::Alive }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness() -> Liveness {
        Liveness { interval: Duration::from_secs(5), timeout: Duration::from_secs(60) }
    }

    fn kernel(since_data: u64, unread: usize, closed: bool) -> Option<TcpPulse> {
        Some(TcpPulse { since_data: Duration::from_secs(since_data), unread, closed })
    }

    #[test]
    fn silence_past_the_timeout_is_death() {
        let l = liveness();
        assert_eq!(l.judge(Duration::from_secs(59), None), Health::Alive);
        assert_eq!(l.judge(Duration::from_secs(60), None), Health::Silent(Duration::from_secs(60)));
    }

    #[test]
    fn the_kernel_hears_a_peer_we_are_too_busy_to_read() {
        let l = liveness();
        // our serving thread ran user code for 10 minutes; heartbeats kept arriving
        assert_eq!(l.judge(Duration::from_secs(600), kernel(3, 300, false)), Health::Alive);
        // and the peer's data piled up unread: it cannot get heartbeats through, not its fault
        assert_eq!(l.judge(Duration::from_secs(600), kernel(600, 1 << 20, false)), Health::Alive);
        // nothing at all came for a minute, the queue is not backed up: dead
        assert_eq!(l.judge(Duration::from_secs(600), kernel(61, 10, false)), Health::Silent(Duration::from_secs(61)));
    }

    #[test]
    fn a_closed_connection_is_closed_whatever_else() {
        assert_eq!(liveness().judge(Duration::ZERO, kernel(0, 0, true)), Health::Closed);
    }
}
