//! A vector of plain numbers inside a struct, as one block: put
//! `#[serde(with = "clusterman::bulk")]` on the field.
//!
//! A `Vec<u8>`, `Vec<f64>`, … that is a remote function's result or its single argument
//! already travels as one block (one `memcpy` to encode, one to decode). Inside a struct, serde
//! hands such a vector over one element at a time, which costs a call per element (about
//! 1 GB/s for bytes). This attribute makes the field one run of bytes instead: its little-endian
//! words, copied at once both ways.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Samples {
//!     channel: u32,
//!     #[serde(with = "clusterman::bulk")]
//!     values: Vec<f64>,
//! }
//! ```
//!
//! The field is written as bytes, so both ends must use the attribute (they share the struct's
//! definition anyway). Other serde formats see a byte string; a format that writes bytes as a
//! list of numbers (JSON) reads them back too.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, Error, SeqAccess, Visitor};
use serde::ser::Serializer;

pub use super::plain::Plain;

/// Writes `values` (a `Vec`, `Box<[_]>` or `Cow<[_]>` of plain numbers) as one run of their
/// little-endian bytes.
pub fn serialize<E: Plain, T: AsRef<[E]> + ?Sized, S: Serializer>(values: &T, serializer: S) -> Result<S::Ok, S::Error> {
    let bytes = super::plain::bytes_of(values.as_ref());
    if cfg!(target_endian = "little") {
        return serializer.serialize_bytes(bytes);
    }
    let mut swapped = bytes.to_vec();
    swapped.chunks_exact_mut(std::mem::size_of::<E>()).for_each(<[u8]>::reverse);
    serializer.serialize_bytes(&swapped)
}

/// Reads what [`serialize`] wrote: one copy into the vector's own allocation, whose size is
/// that of the bytes present (a `Box<[_]>` or `Cow<[_]>` field takes that vector as it is).
pub fn deserialize<'de, E: Plain, T: From<Vec<E>>, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_byte_buf(Words(PhantomData)).map(T::from)
}

struct Words<E>(PhantomData<E>);

impl<'de, E: Plain> Visitor<'de> for Words<E> {
    type Value = Vec<E>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the bytes of {}-byte numbers", std::mem::size_of::<E>())
    }

    fn visit_bytes<Er: Error>(self, bytes: &[u8]) -> Result<Vec<E>, Er> {
        let size = std::mem::size_of::<E>();
        if bytes.len() % size != 0 {
            return Err(Er::custom(format!("{} bytes are not a whole number of {size}-byte numbers", bytes.len())));
        }
        let mut values = super::plain::copied::<E>(bytes);
        if cfg!(target_endian = "big") {
            // SAFETY: the vector's `bytes.len()` bytes are initialised; each element's bytes
            // are swapped in place, and every bit pattern is a valid E.
            let raw = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), bytes.len()) };
            raw.chunks_exact_mut(size).for_each(<[u8]>::reverse);
        }
        Ok(values)
    }

    /// Formats that write bytes as a list of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<E>, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        self.visit_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use crate::codec;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Mixed {
        name: String,
        #[serde(with = "crate::codec::bulk")]
        values: Vec<f64>,
        #[serde(with = "crate::codec::bulk")]
        raw: Vec<u8>,
        #[serde(with = "crate::codec::bulk")]
        counts: Box<[i32]>,
        #[serde(with = "crate::codec::bulk")]
        borrowed: std::borrow::Cow<'static, [u16]>,
        after: u16,
    }

    #[test]
    fn fields_round_trip_as_one_run_of_their_bytes() {
        let value = Mixed { name: "x".into(), values: vec![1.5, -2.0, f64::MAX], raw: vec![1, 2, 3], counts: vec![-1, 7].into(), borrowed: (&[5u16, 6][..]).into(), after: 9 };
        let bytes = codec::encode(&value).unwrap();
        // the f64 field: its byte count, then its memory as it is
        let at = 8 + 1;
        assert_eq!(u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()), 24);
        assert_eq!(&bytes[at + 8..at + 16], &1.5f64.to_le_bytes());
        assert_eq!(codec::decode::<Mixed>(&bytes).unwrap(), value);
    }

    #[test]
    fn a_format_that_writes_bytes_as_numbers_reads_them_back() {
        let value = Mixed { name: "j".into(), values: vec![0.25, 3.0], raw: vec![255, 0], counts: vec![i32::MIN].into(), borrowed: vec![1].into(), after: 1 };
        let json = serde_json::to_string(&value).unwrap();
        assert!(json.contains("\"raw\":[255,0]"), "{json}");
        assert_eq!(serde_json::from_str::<Mixed>(&json).unwrap(), value);
    }

    #[test]
    fn a_run_that_is_no_whole_number_of_words_is_refused() {
        #[derive(Serialize)]
        struct Bytes {
            #[serde(with = "crate::codec::bulk")]
            v: Vec<u8>,
        }
        #[derive(Deserialize, Debug)]
        struct Wide {
            #[serde(with = "crate::codec::bulk")]
            #[allow(dead_code)]
            v: Vec<u32>,
        }
        let bytes = codec::encode(&Bytes { v: vec![0; 7] }).unwrap();
        let err = codec::decode::<Wide>(&bytes).unwrap_err().to_string();
        assert!(err.contains("7 bytes are not a whole number of 4-byte numbers"), "{err}");
    }

    #[test]
    fn a_lying_length_allocates_nothing() {
        #[derive(Deserialize, Debug)]
        struct Wide {
            #[serde(with = "crate::codec::bulk")]
            #[allow(dead_code)]
            v: Vec<u64>,
        }
        let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        assert!(codec::decode::<Wide>(&bytes).is_err());
    }
}
