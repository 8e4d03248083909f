//! The one place that knows how values are serialized: serde into a compact binary form
//! (little-endian fixed-width numbers, `u64` lengths before strings, sequences and maps, `u32`
//! enum variant indices; the layout of bincode 2 with fixed-width integers). Numeric arrays
//! encode as plain little-endian words. Swapping the codec means changing this module only.
//!
//! The decoder is written for input from the network: a length that claims more bytes than
//! are left is an error before anything is allocated, so a few lying bytes can never make a
//! process reserve gigabytes; nesting depth and zero-sized elements are bounded too.

pub mod bulk;
mod de;
mod plain;
mod ser;

use std::any::Any;

use clusterman_macros::remote_path;
use serde::{Serialize, de::DeserializeOwned};

use crate::buffers;
use crate::error::{Error, Result};

pub use plain::{Bulk, HeldWords};

/// Why a value could not be encoded or decoded.
#[derive(Debug)]
pub(crate) struct CodecError(String);

impl CodecError {
    fn new(message: impl Into<String>) -> Self {
        CodecError(message.into())
    }
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl serde::ser::Error for CodecError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        CodecError(msg.to_string())
    }
}

impl serde::de::Error for CodecError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        CodecError(msg.to_string())
    }
}

/// Appends the encoding of `value` to `out` (no intermediate buffer), element by element.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    value.serialize(&mut ser::Encoder { out }).map_err(|e| Error::Codec(e.0))
}

/// [`encode_into`] for an owned value, the same bytes: a vector of plain numbers (`Vec<u8>`,
/// `Vec<f64>`, `Box<[i32]>`, … alone or as a single argument) is copied as one block.
pub fn encode_value_into<T: Serialize + Any>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    match plain::numbers(value) {
        Some((count, bytes)) => {
            buffers::reserve(out, 8 + bytes.len());
            out.extend_from_slice(&(count as u64).to_le_bytes());
            out.extend_from_slice(bytes);
            Ok(())
        }
        None => encode_into(value, out),
    }
}

/// Bytes of plain-number words from which a vector (a result, or a single argument) travels
/// apart from its frame: sent from where the value holds them, received into the vector the
/// other side gets (smaller ones are copied into and out of the frame).
pub const BULK_FROM: usize = 1 << 20;

/// [`encode_value_into`] for a value given away, except that the words of a vector of plain
/// numbers of at least `apart_from` bytes are not copied: only their count goes into `out`,
/// and the words are returned as the value holds them, to be sent from there.
#[remote_path]
pub fn encode_held_into<T: Serialize + Any>(value: T, out: &mut Vec<u8>, apart_from: usize) -> Result<Option<HeldWords>> {
    match plain::numbers(&value) {
        Some((_, bytes)) if bytes.len() >= apart_from => match plain::into_words(value) {
            Ok(words) => {
                out.extend_from_slice(&words.count().to_le_bytes());
                Ok(Some(words))
            }
            Err(value) => encode_value_into(&value, out).map(|()| None),
        },
        _ => encode_value_into(&value, out).map(|()| None),
    }
}

/// Decodes a whole `T` from `bytes` and, for a big vector of plain numbers whose words came
/// apart from its frame, those `words` (then `bytes` is their count): they become the vector
/// without a copy when `T` is one of their type.
#[remote_path]
pub fn decode_with<T: DeserializeOwned + Any>(bytes: &[u8], words: Option<Bulk>) -> Result<T> {
    let Some(words) = words else { return decode(bytes) };
    let count = match bytes.try_into() {
        Ok(count) => u64::from_le_bytes(count),
        Err(_) => return Err(Error::Codec(format!("{} bytes where a count of the words that follow was expected", bytes.len()))),
    };
    match plain::from_bulk::<T>(count, words) {
        Ok(decoded) => decoded.map_err(|e| Error::Codec(e.0)),
        Err(words) => decode(&[bytes, words.bytes()].concat()), // not a vector of them: as one
    }
}

/// Encodes `value` into a fresh vector.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes a whole `T` from `bytes`; trailing bytes are an error. A vector of plain numbers
/// is copied as one block.
#[remote_path]
pub fn decode<T: DeserializeOwned + Any>(bytes: &[u8]) -> Result<T> {
    if let Some(value) = plain::decode::<T>(bytes) {
        return value.map_err(|e| Error::Codec(e.0));
    }
    let mut decoder = de::Decoder::new(bytes);
    let value = T::deserialize(&mut decoder).map_err(|e| Error::Codec(e.0))?;
    if !decoder.input.is_empty() {
        return Err(Error::Codec(format!("{} trailing bytes after the value", decoder.input.len())));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Point,
        Circle(f64),
        Rect { w: u32, h: u32 },
        Poly(Vec<(i16, i16)>, Option<String>),
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Everything {
        flag: bool,
        small: (i8, u8, i16, u16),
        wide: (i64, u64, i128, u128),
        floats: (f32, f64),
        letter: char,
        text: String,
        bytes: Vec<u8>,
        shapes: Vec<Shape>,
        map: BTreeMap<String, Vec<u64>>,
        hash: HashMap<u32, Option<bool>>,
        unit: (),
        newtype: Wrapper,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Wrapper(u16);

    fn everything() -> Everything {
        Everything {
            flag: true,
            small: (-3, 250, -30_000, 65_000),
            wide: (i64::MIN, u64::MAX, -1, u128::MAX),
            floats: (1.5, -2.25e300),
            letter: 'λ',
            text: "héllo".into(),
            bytes: vec![0, 1, 255],
            shapes: vec![Shape::Point, Shape::Circle(2.0), Shape::Rect { w: 3, h: 4 }, Shape::Poly(vec![(1, -1)], Some("p".into()))],
            map: [("a".to_string(), vec![1, 2]), ("b".to_string(), vec![])].into(),
            hash: [(7, Some(false)), (8, None)].into(),
            unit: (),
            newtype: Wrapper(9),
        }
    }

    #[test]
    fn every_serde_shape_round_trips() {
        let v = everything();
        assert_eq!(decode::<Everything>(&encode(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn numbers_are_little_endian_words_and_lengths_u64() {
        assert_eq!(encode(&vec![1.0f64, 2.0]).unwrap()[..8], 2u64.to_le_bytes());
        assert_eq!(encode(&(7u32, "ab")).unwrap(), [7, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
    }

    #[test]
    fn vectors_of_plain_numbers_are_one_block_with_the_same_bytes() {
        fn same<T: Serialize + DeserializeOwned + Any + PartialEq + std::fmt::Debug>(value: T) {
            let mut block = Vec::new();
            encode_value_into(&value, &mut block).unwrap();
            assert_eq!(block, encode(&value).unwrap(), "{}", std::any::type_name::<T>());
            assert!(plain::numbers(&value).is_some(), "{} goes as a block", std::any::type_name::<T>());
            assert_eq!(decode::<T>(&block).unwrap(), value);
            // the element-by-element decoder reads the block too
            let mut decoder = de::Decoder::new(&block);
            assert_eq!(T::deserialize(&mut decoder).unwrap(), value);
        }
        same(vec![0u8, 1, 255]);
        same(vec![-1i8, 7]);
        same(vec![1u16, 65535]);
        same(vec![-2i16]);
        same(vec![3u32, 4]);
        same(vec![-5i32, i32::MAX]);
        same(vec![u64::MAX]);
        same(vec![i64::MIN, 0]);
        same(vec![u128::MAX]);
        same(vec![-1i128]);
        same(vec![1.5f32, -0.0]);
        same(vec![f64::MAX, f64::MIN_POSITIVE, 2.25]);
        same(Vec::<f64>::new());
        same(vec![9i32; 3].into_boxed_slice());
        same(std::borrow::Cow::<'static, [u16]>::Owned(vec![7, 8]));
        same((vec![1.0f64, 2.0],));
        // everything else goes element by element
        assert!(plain::numbers(&vec![true]).is_none() && plain::numbers(&(vec![1u8], 2u8)).is_none());
    }

    #[test]
    fn big_vectors_given_away_keep_their_words_where_they_are() {
        /// The count written, the held words and their first byte's address, or `None`.
        fn held<T: Serialize + Any>(value: T, apart_from: usize) -> Option<(Vec<u8>, Vec<u8>, usize)> {
            let mut out = Vec::new();
            let words = encode_held_into(value, &mut out, apart_from).unwrap();
            words.map(|w| (out, w.bytes().to_vec(), w.bytes().as_ptr() as usize))
        }
        static STATIC: [u32; 3] = [1, 2, 3];
        for value in [vec![1.5f64, 2.5], vec![]] {
            let (expected, at) = (encode(&value).unwrap(), value.as_ptr() as usize);
            let (count, words, ptr) = held(value, 0).unwrap();
            assert_eq!([count, words].concat(), expected, "the same bytes as the encoding");
            assert_eq!(ptr, at, "not copied");
        }
        let (count, words, ptr) = held(std::borrow::Cow::<'static, [u32]>::Borrowed(&STATIC), 12).unwrap();
        assert_eq!((count, words.len(), ptr), (3u64.to_le_bytes().to_vec(), 12, STATIC.as_ptr() as usize), "a borrowed static slice is sent from where it is");
        assert!(held(vec![7i16; 9].into_boxed_slice(), 18).is_some() && held((vec![7u8; 5],), 5).is_some());
        assert!(held(vec![1u8; 5], 6).is_none(), "smaller than apart_from: in the frame");
        let mut out = Vec::new();
        assert!(encode_held_into((vec![1u8], 2u8), &mut out, 0).unwrap().is_none(), "not a plain vector: encoded");
        assert_eq!(out, encode(&(vec![1u8], 2u8)).unwrap());
    }

    #[test]
    fn a_block_with_a_lying_count_is_an_error_before_any_allocation() {
        let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = decode::<Vec<f64>>(&bytes).unwrap_err().to_string();
        assert!(err.contains("exceed the 16 bytes left"), "{err}");
        assert!(decode::<Vec<u64>>(&u64::MAX.to_le_bytes()).is_err());
        assert!(decode::<Vec<u8>>(&[3, 0, 0]).is_err(), "a cut count");
        let mut cut = encode(&vec![1u32, 2, 3]).unwrap();
        cut.pop();
        assert!(decode::<Vec<u32>>(&cut).is_err(), "a cut element");
        let mut long = encode(&vec![1u32]).unwrap();
        long.push(0);
        let err = decode::<Vec<u32>>(&long).unwrap_err().to_string();
        assert!(err.contains("1 trailing bytes"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode(&(7u64, String::from("x"))).unwrap();
        bytes.push(0);
        assert!(decode::<(u64, String)>(&bytes).is_err());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = encode(&everything()).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<Everything>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_lying_length_is_an_error_before_any_allocation() {
        // a string claiming 2^40 bytes with 3 present
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let err = decode::<String>(&bytes).unwrap_err().to_string();
        assert!(err.contains("exceeds the 3 bytes left"), "{err}");
        // a sequence claiming 2^60 elements: the hint is capped by the bytes left
        let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        assert!(decode::<Vec<u64>>(&bytes).is_err());
    }

    #[test]
    fn zero_sized_elements_and_nesting_are_bounded() {
        let bytes = u64::MAX.to_le_bytes();
        let err = decode::<Vec<()>>(&bytes).unwrap_err().to_string();
        assert!(err.contains("zero-sized"), "{err}");
        assert_eq!(decode::<Vec<()>>(&encode(&vec![(); 1000]).unwrap()).unwrap().len(), 1000);

        #[derive(Debug, Serialize, Deserialize)]
        struct List(Option<Box<List>>);
        let deep = vec![1u8; 100_000]; // Some(Some(Some(...
        let err = decode::<List>(&deep).unwrap_err().to_string();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn invalid_tags_are_errors() {
        assert!(decode::<bool>(&[2]).is_err());
        assert!(decode::<Option<u8>>(&[9, 1]).is_err());
        assert!(decode::<char>(&0xd800u32.to_le_bytes()).is_err());
        assert!(decode::<Shape>(&9u32.to_le_bytes()).is_err());
        let mut bad_utf8 = 2u64.to_le_bytes().to_vec();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert!(decode::<String>(&bad_utf8).is_err());
    }
}
