//! The one place that knows how values are serialized (bincode 2 with serde, fixed-width
//! integers: numeric arrays encode as plain little-endian words, which is the fast path for
//! large results). Swapping the codec means changing this file only.

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

const CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::NoLimit,
> = bincode::config::standard().with_fixed_int_encoding();

/// Appends the encoding of `value` to `out` (no intermediate buffer).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    bincode::serde::encode_into_std_write(value, out, CONFIG)
        .map(|_| ())
        .map_err(|e| Error::Codec(e.to_string()))
}

/// Encodes `value` into a fresh vector.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes a whole `T` from `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, CONFIG).map_err(|e| Error::Codec(e.to_string()))?;
    if used != bytes.len() {
        return Err(Error::Codec(format!("{} trailing bytes after the value", bytes.len() - used)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_trailing_bytes() {
        let v = (7u64, String::from("x"), vec![1.5f64, 2.5]);
        let mut bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, String, Vec<f64>)>(&bytes).unwrap(), v);
        bytes.push(0);
        assert!(decode::<(u64, String, Vec<f64>)>(&bytes).is_err());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = encode(&vec![1u64; 10]).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<Vec<u64>>(&bytes[..cut]).is_err());
        }
    }
}
