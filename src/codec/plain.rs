//! Vectors of plain numbers (`Vec<u8>`, `Vec<f64>`, `Box<[i32]>`, …) as one block: the same
//! bytes serde would write (a `u64` count, then the little-endian words), but copied in one
//! `memcpy` instead of one call per element. Chosen by the value's type, so only for owned
//! (`'static`) values at the top of an encoding: a remote function's result, its single
//! argument, a pmap item. A vector inside a struct goes element by element, unless its field
//! says `#[serde(with = "clusterman::bulk")]` (see `bulk`).

use std::any::{Any, TypeId};
use std::borrow::Cow;

use clusterman_macros::remote_path;

use super::CodecError;
use crate::sys;

/// A decoded vector this big asks for huge pages (see [`sys::prefer_huge_pages`]).
const HUGE_PAGES_FROM: usize = 4 << 20;

/// A plain number (`u8` … `u128`, `i8` … `i128`, `f32`, `f64`): every bit pattern is a
/// value, and its memory is its little-endian encoding on a little-endian machine. Sealed:
/// implemented for those types only.
pub trait Plain: sealed::Sealed + Copy + 'static {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! plain {
    ($($t:ty),*) => {$(impl sealed::Sealed for $t {} impl Plain for $t {})*};
}
plain!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, f32, f64);

/// Calls `$then!(E)` for every plain number type `E`.
macro_rules! each_plain {
    ($then:ident) => {
        $then!(u8);
        $then!(i8);
        $then!(u16);
        $then!(i16);
        $then!(u32);
        $then!(i32);
        $then!(u64);
        $then!(i64);
        $then!(u128);
        $then!(i128);
        $then!(f32);
        $then!(f64);
    };
}

pub(super) fn bytes_of<E: Plain>(v: &[E]) -> &[u8] {
    // SAFETY: E is a plain number (no padding, no invalid bytes); the bytes live as long as `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The elements of `value` and their bytes, if it is a vector of plain numbers (alone, or as
/// the one element of a tuple: a function's single argument).
pub(super) fn numbers<T: Any>(value: &T) -> Option<(usize, &[u8])> {
    if cfg!(target_endian = "big") {
        return None;
    }
    let any = value as &dyn Any;
    macro_rules! find {
        ($e:ty) => {
            let slice: Option<&[$e]> = any
                .downcast_ref::<Vec<$e>>()
                .map(|v| &v[..])
                .or_else(|| any.downcast_ref::<Box<[$e]>>().map(|v| &v[..]))
                .or_else(|| any.downcast_ref::<Cow<'static, [$e]>>().map(|v| &v[..]))
                .or_else(|| any.downcast_ref::<(Vec<$e>,)>().map(|v| &v.0[..]));
            if let Some(slice) = slice {
                return Some((slice.len(), bytes_of(slice)));
            }
        };
    }
    each_plain!(find);
    None
}

/// Whether `T` is a vector of `E` in one of the shapes [`numbers`] knows.
fn is_vector_of<E: Plain, T: Any>() -> bool {
    let id = TypeId::of::<T>();
    [TypeId::of::<Vec<E>>(), TypeId::of::<Box<[E]>>(), TypeId::of::<Cow<'static, [E]>>(), TypeId::of::<(Vec<E>,)>()].contains(&id)
}

/// `v` in the shape of `T`, a vector of `E` (see [`is_vector_of`]).
fn shaped<E: Plain, T: Any>(v: Vec<E>) -> T {
    let id = TypeId::of::<T>();
    if id == TypeId::of::<Vec<E>>() {
        cast(v)
    } else if id == TypeId::of::<Box<[E]>>() {
        cast(v.into_boxed_slice())
    } else if id == TypeId::of::<Cow<'static, [E]>>() {
        cast(Cow::<'static, [E]>::Owned(v))
    } else {
        cast((v,))
    }
}

/// Decodes `bytes` as a `T` in one copy, if `T` is a vector of plain numbers (as
/// [`numbers`] knows them); `None` for every other type.
#[remote_path]
pub(super) fn decode<T: Any>(bytes: &[u8]) -> Option<Result<T, CodecError>> {
    if cfg!(target_endian = "big") {
        return None;
    }
    macro_rules! find {
        ($e:ty) => {
            if is_vector_of::<$e, T>() {
                return Some(read::<$e>(bytes).map(shaped));
            }
        };
    }
    each_plain!(find);
    None
}

/// `T` made of `bulk` and the `count` its encoding announced, without a copy, if `T` is a
/// vector of plain numbers; the block back for every other type.
pub(super) fn from_bulk<T: Any>(count: u64, bulk: Bulk) -> Result<Result<T, CodecError>, Bulk> {
    if cfg!(target_endian = "big") {
        return Err(bulk);
    }
    macro_rules! find {
        ($e:ty) => {
            if is_vector_of::<$e, T>() {
                return Ok(match bulk.into_vec::<$e>() {
                    Ok(v) if v.len() as u64 == count => Ok(shaped(v)),
                    Ok(v) => Err(CodecError::new(format!("{count} elements announced, {} received", v.len()))),
                    Err(bulk) => Err(CodecError::new(format!("{} bytes of elements of {} bytes cannot be {} elements of {} bytes", bulk.len(), bulk.element_size(), count, std::mem::size_of::<$e>()))),
                });
            }
        };
    }
    each_plain!(find);
    Err(bulk)
}

/// A value of type `A` that is known to be of type `B` (same `TypeId`), as a `B`.
fn cast<A: Any, B: Any>(value: A) -> B {
    let mut slot = Some(value);
    (&mut slot as &mut dyn Any).downcast_mut::<Option<B>>().and_then(Option::take).expect("cast between one type")
}

/// A `u64` count and exactly that many `E`s, checked against the bytes present before the
/// vector is allocated.
fn read<E: Plain>(bytes: &[u8]) -> Result<Vec<E>, CodecError> {
    let Some((count, words)) = bytes.split_first_chunk::<8>() else {
        return Err(CodecError::new(format!("a length of 8 bytes exceeds the {} bytes left", bytes.len())));
    };
    let count = u64::from_le_bytes(*count);
    let size = usize::try_from(count).ok().and_then(|c| c.checked_mul(std::mem::size_of::<E>()));
    match size {
        Some(size) if size == words.len() => {}
        Some(size) if size < words.len() => return Err(CodecError::new(format!("{} trailing bytes after the value", words.len() - size))),
        _ => return Err(CodecError::new(format!("{count} elements exceed the {} bytes left", words.len()))),
    }
    Ok(copied(words))
}

/// A new vector of the `E`s whose memory is `words` (a whole number of them), in one copy; a
/// big one asks for huge pages (fewer page faults as the copy first touches it).
pub(super) fn copied<E: Plain>(words: &[u8]) -> Vec<E> {
    let count = words.len() / std::mem::size_of::<E>();
    debug_assert_eq!(count * std::mem::size_of::<E>(), words.len());
    let mut v = Vec::<E>::with_capacity(count);
    if words.len() >= HUGE_PAGES_FROM {
        sys::prefer_huge_pages(v.as_mut_ptr().cast(), words.len());
    }
    // SAFETY: the vector has room for `count` elements, which are exactly `words.len()`
    // bytes; every bit pattern is a valid E.
    unsafe {
        std::ptr::copy_nonoverlapping(words.as_ptr(), v.as_mut_ptr().cast::<u8>(), words.len());
        v.set_len(count);
    }
    v
}

/// The words of a plain-number vector received straight into an allocation of their own
/// (a big argument or result, apart from its frame), which becomes the decoded vector as it is:
/// no copy, no second buffer. Stored as unsigned words of the element's size, whose memory
/// layout (size and alignment) every plain type of that size shares.
#[derive(Debug)]
pub struct Bulk {
    words: Words,
    /// Bytes received so far (possibly ending inside a word).
    filled: usize,
    /// Bytes from the start whose pages are memory already (see [`Bulk::room_ahead`]).
    populated: usize,
}

/// How far ahead of the bytes received a huge block's pages are made memory.
const POPULATE_AHEAD: usize = 8 << 20;

#[derive(Debug)]
enum Words {
    W1(Vec<u8>),
    W2(Vec<u16>),
    W4(Vec<u32>),
    W8(Vec<u64>),
    W16(Vec<u128>),
}

/// Calls `$body` with `$v` bound to the vector inside `$words`, whatever its word.
macro_rules! with_words {
    ($words:expr, $v:ident => $body:expr) => {
        match $words {
            Words::W1($v) => $body,
            Words::W2($v) => $body,
            Words::W4($v) => $body,
            Words::W8($v) => $body,
            Words::W16($v) => $body,
        }
    };
}

impl Bulk {
    /// An empty block of elements of `size` bytes (1, 2, 4, 8 or 16; `None` otherwise).
    pub fn new(size: usize) -> Option<Bulk> {
        let words = match size {
            1 => Words::W1(Vec::new()),
            2 => Words::W2(Vec::new()),
            4 => Words::W4(Vec::new()),
            8 => Words::W8(Vec::new()),
            16 => Words::W16(Vec::new()),
            _ => return None,
        };
        Some(Bulk { words, filled: 0, populated: 0 })
    }

    /// Bytes of one element.
    pub fn element_size(&self) -> usize {
        with_words!(&self.words, v => word_size(v))
    }

    /// Bytes received.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Room for `bytes` more bytes; returns where they go and how many fit. The room is
    /// address space taken at once, not grown by copies (which would touch every byte again):
    /// its pages become memory only as bytes land in them. Where the system refuses that
    /// much address space (strict overcommit), the room is only as much again as is here, at
    /// least 1 MiB: then fewer than `bytes` may fit. A block of 4 MiB or more asks for huge
    /// pages (see [`sys::prefer_huge_pages`]).
    pub fn room(&mut self, bytes: usize) -> (*mut u8, usize) {
        let filled = self.filled;
        with_words!(&mut self.words, v => {
            let size = word_size(v);
            let need = (filled + bytes).div_ceil(size);
            if need > v.capacity() {
                // len is 0: a reservation counts words in all
                if v.try_reserve_exact(need).is_err() {
                    v.reserve_exact(need.min((2 * filled).max(filled + (1 << 20)).div_ceil(size)));
                }
                if v.capacity() * size >= HUGE_PAGES_FROM {
                    sys::prefer_huge_pages(v.as_mut_ptr().cast(), v.capacity() * size);
                }
            }
            // SAFETY: `filled` bytes are inside the allocation (filled <= capacity * size).
            (unsafe { v.as_mut_ptr().cast::<u8>().add(filled) }, v.capacity() * size - filled)
        })
    }

    /// [`room`](Bulk::room) for a socket read: in a big block it ends where the pages are
    /// memory already, made so [`POPULATE_AHEAD`] at a time. A page fault inside a socket read
    /// holds the socket, and the sender stalls meanwhile (on a VM whose free memory goes
    /// back to its host, clearing a fresh huge page can take a millisecond).
    pub fn room_ahead(&mut self, bytes: usize) -> (*mut u8, usize) {
        let (at, room) = self.room(bytes);
        let end = self.filled + room; // the block's capacity in bytes
        if end < HUGE_PAGES_FROM {
            return (at, room);
        }
        let ahead = (self.filled + POPULATE_AHEAD).min(end);
        let start = at.wrapping_sub(self.filled);
        // SAFETY: `populated..ahead` lies inside the block's allocation.
        if self.populated < ahead && !sys::populate(unsafe { start.add(self.populated) }, ahead - self.populated) {
            self.populated = end; // the system cannot: faults come as the bytes land, and it is not asked again
            return (at, room);
        }
        self.populated = self.populated.max(ahead);
        (at, self.populated - self.filled)
    }

    /// Counts `n` more bytes as received.
    ///
    /// # Safety
    /// The `n` bytes after those received must have been written, inside the room that
    /// [`room`](Bulk::room) returned.
    pub unsafe fn advance(&mut self, n: usize) {
        self.filled += n;
    }

    /// The bytes received.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the first `filled` bytes of the allocation were written (`advance`).
        with_words!(&self.words, v => unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), self.filled) })
    }

    /// The block as a `Vec<E>` of its whole elements, if `E` has its element's layout.
    fn into_vec<E: Plain>(self) -> Result<Vec<E>, Bulk> {
        let (size, align) = with_words!(&self.words, v => (word_size(v), word_align(v)));
        if size != std::mem::size_of::<E>() || align != std::mem::align_of::<E>() || self.filled % size != 0 {
            return Err(self);
        }
        let count = self.filled / size;
        // SAFETY: E and the word have the same size and alignment, so the allocation's layout
        // is that of a Vec<E> of the same capacity; its first `count` elements were written,
        // and every bit pattern is a valid E.
        Ok(with_words!(self.words, v => unsafe { reuse::<_, E>(v, count) }))
    }
}

/// `v`'s allocation as a `Vec<E>` of `count` elements.
///
/// # Safety
/// `E` must have `W`'s size and alignment, and the first `count` elements must be written.
unsafe fn reuse<W, E>(v: Vec<W>, count: usize) -> Vec<E> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: as the caller promises.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<E>(), count, v.capacity()) }
}

fn word_size<W>(_: &Vec<W>) -> usize {
    std::mem::size_of::<W>()
}

fn word_align<W>(_: &Vec<W>) -> usize {
    std::mem::align_of::<W>()
}

/// A vector of plain numbers, seen as its bytes.
trait AsBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl<E: Plain + Send + Sync> AsBytes for Vec<E> {
    fn bytes(&self) -> &[u8] {
        bytes_of(self)
    }
}

impl<E: Plain + Send + Sync> AsBytes for Box<[E]> {
    fn bytes(&self) -> &[u8] {
        bytes_of(self)
    }
}

impl<E: Plain + Send + Sync> AsBytes for &'static [E] {
    fn bytes(&self) -> &[u8] {
        bytes_of(self)
    }
}

impl AsBytes for Bulk {
    fn bytes(&self) -> &[u8] {
        Bulk::bytes(self)
    }
}

/// The words of a big result where the value holds them (its own allocation, or the static
/// slice it borrowed), so they are sent from there: no copy into a frame, no second buffer.
pub struct HeldWords {
    data: Box<dyn AsBytes>,
    element_size: usize,
}

impl std::fmt::Debug for HeldWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeldWords({} bytes of {}-byte words)", self.data.bytes().len(), self.element_size)
    }
}

impl HeldWords {
    fn new<E: Plain + Send + Sync>(data: impl AsBytes + 'static) -> HeldWords {
        HeldWords { data: Box::new(data), element_size: std::mem::size_of::<E>() }
    }

    /// The words' bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// Bytes of one element.
    pub fn element_size(&self) -> usize {
        self.element_size
    }

    /// The number of elements.
    pub fn count(&self) -> u64 {
        (self.bytes().len() / self.element_size) as u64
    }

    /// Appends the words to their count in `out`: the whole encoding in one buffer, for a
    /// value that is decoded where it was made.
    pub fn append_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.bytes());
    }
}

impl From<Bulk> for HeldWords {
    fn from(bulk: Bulk) -> HeldWords {
        let element_size = bulk.element_size();
        HeldWords { data: Box::new(bulk), element_size }
    }
}

/// `value`'s words as it holds them, if it is a vector of plain numbers (as [`numbers`]
/// knows them); the value back for every other type.
pub(super) fn into_words<T: Any>(value: T) -> Result<HeldWords, T> {
    if cfg!(target_endian = "big") {
        return Err(value);
    }
    let is = |id: TypeId| TypeId::of::<T>() == id;
    macro_rules! find {
        ($e:ty) => {
            if is(TypeId::of::<Vec<$e>>()) {
                return Ok(HeldWords::new::<$e>(cast::<T, Vec<$e>>(value)));
            }
            if is(TypeId::of::<Box<[$e]>>()) {
                return Ok(HeldWords::new::<$e>(cast::<T, Box<[$e]>>(value)));
            }
            if is(TypeId::of::<Cow<'static, [$e]>>()) {
                return Ok(match cast::<T, Cow<'static, [$e]>>(value) {
                    Cow::Owned(v) => HeldWords::new::<$e>(v),
                    Cow::Borrowed(s) => HeldWords::new::<$e>(s),
                });
            }
            if is(TypeId::of::<(Vec<$e>,)>()) {
                return Ok(HeldWords::new::<$e>(cast::<T, (Vec<$e>,)>(value).0));
            }
        };
    }
    each_plain!(find);
    Err(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_block_is_received_a_populated_stretch_at_a_time_and_whole() {
        const BYTES: usize = 3 * POPULATE_AHEAD + 12_345;
        const PIECE: usize = 1 << 20; // reads come in pieces
        let pattern: Vec<u8> = (0..2 * PIECE).map(|i| (i % 251) as u8).collect();
        let mut bulk = Bulk::new(1).expect("bytes are words");
        let mut largest_room = 0;
        while bulk.len() < BYTES {
            let (at, room) = bulk.room_ahead(BYTES - bulk.len());
            largest_room = largest_room.max(room);
            let n = room.min(BYTES - bulk.len()).min(PIECE);
            let from = &pattern[bulk.len() % 251..][..n]; // byte i of the block is i % 251
            // SAFETY: `n` bytes of the room just given are written, then counted.
            unsafe {
                std::ptr::copy_nonoverlapping(from.as_ptr(), at, n);
                bulk.advance(n);
            }
        }
        // (a kernel that cannot populate, before Linux 5.14, refuses even an empty range)
        if sys::populate(std::ptr::null_mut::<u8>().wrapping_add(4096), 0) {
            assert!(largest_room <= POPULATE_AHEAD, "a room of {largest_room} bytes runs ahead of what was made memory");
        }
        let v: Vec<u8> = bulk.into_vec().expect("a vector of bytes");
        assert_eq!(v.len(), BYTES);
        assert!(v.chunks(PIECE).enumerate().all(|(k, chunk)| chunk == &pattern[(k * PIECE) % 251..][..chunk.len()]), "every byte where it was written");
    }
}
