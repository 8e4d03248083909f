//! Vectors of plain numbers (`Vec<u8>`, `Vec<f64>`, `Box<[i32]>`, …) as one block: the same
//! bytes serde would write (a `u64` count, then the little-endian words), but copied in one
//! `memcpy` instead of one call per element. Chosen by the value's type, so only for owned
//! (`'static`) values at the top of an encoding: a remote function's result, its single
//! argument, a pmap item. A vector inside a struct goes element by element.

use std::any::{Any, TypeId};
use std::borrow::Cow;

use super::CodecError;
use crate::sys;

/// A decoded vector this big asks for huge pages (see [`sys::prefer_huge_pages`]).
const HUGE_PAGES_FROM: usize = 4 << 20;

/// Numbers whose every bit pattern is a value and whose memory is their little-endian
/// encoding on this machine.
trait Plain: Copy + 'static {}

macro_rules! plain {
    ($($t:ty),*) => {$(impl Plain for $t {})*};
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

fn bytes_of<E: Plain>(v: &[E]) -> &[u8] {
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

/// Decodes `bytes` as a `T` in one copy, if `T` is a vector of plain numbers (as
/// [`numbers`] knows them); `None` for every other type.
pub(super) fn decode<T: Any>(bytes: &[u8]) -> Option<Result<T, CodecError>> {
    if cfg!(target_endian = "big") {
        return None;
    }
    let is = |id: TypeId| TypeId::of::<T>() == id;
    macro_rules! find {
        ($e:ty) => {
            if is(TypeId::of::<Vec<$e>>()) {
                return Some(read::<$e>(bytes).map(cast));
            }
            if is(TypeId::of::<Box<[$e]>>()) {
                return Some(read::<$e>(bytes).map(|v| cast(v.into_boxed_slice())));
            }
            if is(TypeId::of::<Cow<'static, [$e]>>()) {
                return Some(read::<$e>(bytes).map(|v| cast(Cow::<'static, [$e]>::Owned(v))));
            }
            if is(TypeId::of::<(Vec<$e>,)>()) {
                return Some(read::<$e>(bytes).map(|v| cast((v,))));
            }
        };
    }
    each_plain!(find);
    None
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
    let count = count as usize;
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
    Ok(v)
}
