//! Frame buffers, kept for the next frame. Each thread keeps the last two small ones it gave
//! back ([`small`]), so a loop of calls allocates nothing per call. Big ones are kept for the whole
//! process: a fresh buffer costs a page fault per 4 KiB the first time it is written (64 MiB:
//! 16,384 faults, about 45 ms here, several times the copy itself), so the buffers that carry
//! big payloads through this process (an encoded result, a frame read from a socket or from
//! MPI) are reused rather than freed. Only buffers of at least [`MIN_KEPT`] bytes are kept
//! so, at most [`MAX_KEPT`] of them and [`MAX_KEPT_BYTES`] in all, and none for longer than
//! [`KEPT_FOR`] unused (the I/O runtime calls [`release_idle`]), so the memory held back is
//! bounded in size and in time.

use std::cell::RefCell;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clusterman_macros::call_path;

/// Smaller buffers are cheap to allocate: not worth keeping.
pub(crate) const MIN_KEPT: usize = 1 << 20;
const MAX_KEPT: usize = 4;
const MAX_KEPT_BYTES: usize = 1 << 30;
/// A buffer unused this long is freed.
pub(crate) const KEPT_FOR: Duration = Duration::from_secs(10);

/// The buffers this process keeps.
static KEPT: Pool = Pool(Mutex::new(Vec::new()));

/// Told when the pool starts to keep buffers: only then is there anything to release. A
/// timer that ran regardless would wake each of a thousand idle workers every few seconds
/// (and a tokio timer that far out wakes its thread two or three times to get there).
static KEEPING: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Two small buffers are kept per thread, the biggest it gave back, each at most this big: a
/// loop of calls then allocates nothing per call (a serving worker holds the call's frame
/// while it writes the reply: two at once), and no thread holds more than twice this.
const SPARE_AT_MOST: usize = 64 << 10;

thread_local! {
    /// The smaller first; empty vectors where none is kept.
    static SPARE: RefCell<[Vec<u8>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// An empty buffer with room for `capacity` bytes: the smallest spare of this thread that
/// fits, else a new one. The spares change in place: no moves of both in and out.
#[inline]
#[call_path]
pub(crate) fn small(capacity: usize) -> Vec<u8> {
    let spare = SPARE.try_with(|s| {
        let mut s = s.try_borrow_mut().ok()?;
        let [smaller, bigger] = &mut *s;
        if smaller.capacity() >= capacity {
            Some(std::mem::take(smaller))
        } else if bigger.capacity() >= capacity {
            std::mem::swap(smaller, bigger); // the smaller moves up; the empty one goes first
            Some(std::mem::take(smaller))
        } else {
            None
        }
    });
    spare.ok().flatten().unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// An empty buffer with room for at least `capacity` bytes, if one is kept (the smallest
/// that fits).
pub(crate) fn take(capacity: usize) -> Option<Vec<u8>> {
    KEPT.take(capacity)
}

/// Keeps `buffer` for a later [`take`], if it is big enough and there is room; a smaller
/// kept buffer makes way for a bigger one. Never inlined: one copy serves the whole path of
/// a call, where copies inlined apart cost a serving worker a code page each.
#[inline(never)]
#[call_path]
pub(crate) fn give(mut buffer: Vec<u8>) {
    if buffer.capacity() <= SPARE_AT_MOST {
        buffer.clear();
        // the two biggest of the three stay (a thread that is ending keeps nothing)
        let _ = SPARE.try_with(|s| {
            let Ok(mut s) = s.try_borrow_mut() else { return };
            let [smaller, bigger] = &mut *s;
            if buffer.capacity() > bigger.capacity() {
                std::mem::swap(smaller, bigger);
                std::mem::swap(bigger, &mut buffer); // the smallest of the three is dropped
            } else if buffer.capacity() > smaller.capacity() {
                std::mem::swap(smaller, &mut buffer);
            }
        });
        return;
    }
    KEPT.give(buffer)
}

/// Makes room for `additional` more bytes in `buffer`, moving its bytes into a kept buffer
/// when one fits (and keeping the old one) instead of growing into fresh memory.
pub(crate) fn reserve(buffer: &mut Vec<u8>, additional: usize) {
    KEPT.reserve(buffer, additional)
}

/// Frees the buffers kept unused for [`KEPT_FOR`].
pub(crate) fn release_idle() {
    KEPT.release_idle(Instant::now())
}

/// Returns once buffers are kept (at once if some are now).
pub(crate) async fn kept_some() {
    if KEPT.kept().is_empty() {
        KEEPING.notified().await; // a `give` meanwhile left a permit: no wake-up is lost
    }
}

/// Kept buffers, biggest first, each with when it was given back.
struct Pool(Mutex<Vec<(Vec<u8>, Instant)>>);

impl Pool {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<u8>, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release_idle(&self, now: Instant) {
        self.kept().retain(|(_, since)| now.saturating_duration_since(*since) < KEPT_FOR);
    }

    fn take(&self, capacity: usize) -> Option<Vec<u8>> {
        if capacity < MIN_KEPT {
            return None;
        }
        let mut kept = self.kept();
        let best = kept.iter().enumerate().filter(|(_, (b, _))| b.capacity() >= capacity).min_by_key(|(_, (b, _))| b.capacity()).map(|(i, _)| i)?;
        Some(kept.remove(best).0)
    }

    fn give(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() < MIN_KEPT || buffer.capacity() > MAX_KEPT_BYTES {
            return;
        }
        buffer.clear();
        let mut kept = self.kept();
        if kept.is_empty() {
            KEEPING.notify_one();
        }
        kept.push((buffer, Instant::now()));
        kept.sort_unstable_by_key(|(b, _)| std::cmp::Reverse(b.capacity()));
        let mut total = 0;
        kept.retain(|(b, _)| {
            total += b.capacity();
            total <= MAX_KEPT_BYTES
        });
        kept.truncate(MAX_KEPT);
    }

    fn reserve(&self, buffer: &mut Vec<u8>, additional: usize) {
        let needed = buffer.len().saturating_add(additional);
        if buffer.capacity() >= needed {
            return;
        }
        match self.take(needed) {
            Some(mut bigger) => {
                bigger.extend_from_slice(buffer);
                self.give(std::mem::replace(buffer, bigger));
            }
            None => buffer.reserve(additional),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_buffer_given_back_serves_this_threads_next_small_frame() {
        let given = Vec::<u8>::with_capacity(100);
        let at = given.as_ptr();
        give(given);
        let next = small(60);
        assert_eq!(next.as_ptr(), at, "the same allocation, not a new one");
        assert!(next.is_empty());
        let again = small(60);
        assert_ne!(again.as_ptr(), at, "given out once, it is no longer spare");
        give(Vec::with_capacity(4096)); // a call's frame, and its reply's buffer
        give(Vec::with_capacity(64));
        assert_eq!((small(4000).capacity(), small(60).capacity()), (4096, 64), "both kept, each served where it fits");
        give(Vec::with_capacity(50));
        give(Vec::with_capacity(200));
        give(Vec::with_capacity(100));
        assert_eq!((small(1).capacity(), small(1).capacity()), (100, 200), "of three, the two bigger stay; the smaller goes first");
        assert_eq!(small(1).capacity(), 1, "none left");
        give(Vec::with_capacity(SPARE_AT_MOST + 1));
        assert!(small(1).capacity() <= SPARE_AT_MOST, "a thread keeps no more than SPARE_AT_MOST");
        let other = std::thread::spawn(|| small(150).capacity()).join().unwrap();
        assert_eq!(other, 150, "another thread has none of this thread's spare");
    }

    #[test]
    fn big_buffers_are_reused_within_bounds() {
        let pool = Pool(Mutex::new(Vec::new()));
        pool.give(Vec::with_capacity(MIN_KEPT - 1));
        assert!(pool.take(MIN_KEPT - 1).is_none(), "small buffers are neither kept nor asked for");
        pool.give(Vec::with_capacity(4 * MIN_KEPT));
        pool.give(Vec::with_capacity(2 * MIN_KEPT));
        let b = pool.take(MIN_KEPT + 1).expect("a kept buffer");
        assert_eq!(b.capacity(), 2 * MIN_KEPT, "the smallest that fits");
        assert!(b.is_empty());
        let mut grown = vec![7u8; 10];
        pool.reserve(&mut grown, 3 * MIN_KEPT);
        assert!(grown.capacity() >= 4 * MIN_KEPT && grown[..] == [7; 10], "moved into the kept buffer, bytes and all");
        assert!(pool.take(MIN_KEPT).is_none(), "both kept buffers are in use, the small one was not kept");
        for _ in 0..10 {
            pool.give(Vec::with_capacity(300 << 20));
        }
        {
            let kept = pool.kept();
            assert!(kept.len() <= MAX_KEPT && kept.iter().map(|(b, _)| b.capacity()).sum::<usize>() <= MAX_KEPT_BYTES);
            assert_eq!(kept.len(), 3, "three of 300 MiB fit in 1 GiB");
        }
        let given = Instant::now();
        pool.release_idle(given + KEPT_FOR / 2);
        assert_eq!(pool.kept().len(), 3, "used recently: kept");
        pool.release_idle(given + KEPT_FOR * 2);
        assert!(pool.kept().is_empty(), "unused for longer than KEPT_FOR: freed");
    }
}
