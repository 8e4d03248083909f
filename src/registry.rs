//! The remote-function registry: every `#[remote]` function puts one [`RemoteEntry`] into a
//! link-time slice (linkme), so the table exists in every process of the same binary without
//! any code running before `main`. Functions are found by a 64-bit hash of their
//! module-qualified name, so a different function set cannot silently misroute a call; the
//! handshake compares the table's hash anyway.

use std::cell::{Cell, RefCell};
use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use clusterman_macros::{call_path, remote_path};
use serde::{Serialize, de::DeserializeOwned};

use crate::codec::{self, Bulk, HeldWords};

/// A function that can be run on another process. Implemented by `#[remote]`; use the
/// generated unit struct (it has the function's name) wherever a `RemoteFn` is asked for.
pub trait RemoteFn: Copy + Send + Sync + 'static {
    /// The arguments as a tuple: `(A, B)`, `(A,)` or `()`.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The result (for a function returning `Result<T, E>`, this is `T`).
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Module-qualified name, e.g. `my_crate::simulate`.
    const NAME: &'static str;
    /// Hash of [`RemoteFn::NAME`]: the id on the wire.
    const ID: u64 = fn_id(Self::NAME);
    /// Runs the function here. `Err` carries the `Display` of an error the function returned.
    fn invoke(args: Self::Args) -> Result<Self::Output, String>;
}

/// FNV-1a of a name, at compile time.
pub const fn fn_id(name: &str) -> u64 {
    let bytes = name.as_bytes();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Why running a registered function failed (the pid is added by the caller).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallError {
    /// Panic message, returned error, or decoding problem.
    pub message: String,
    /// Panic location.
    pub location: Option<String>,
}

/// One registered function.
#[derive(Debug)]
pub struct RemoteEntry {
    /// Module-qualified name.
    pub name: &'static str,
    /// Argument and result types as written, e.g. `fn(u64, u32) -> f64`.
    pub signature: &'static str,
    /// Decodes one argument tuple (its payload, and the words of a big argument that came
    /// apart), runs, appends the encoded result to the output buffer; a big vector of plain
    /// numbers leaves its words where they are (see `encode_result`).
    pub call: CallFn,
    /// Decodes a `Vec` of argument tuples, runs each, appends a `Vec<Result<Output, CallError>>`.
    pub batch: fn(&[u8], &mut Vec<u8>) -> Result<(), CallError>,
    /// Decodes a `Vec` of argument tuples, runs each and folds the results in order with the
    /// given function (whose arguments are two results), appends the `Option<Output>`.
    pub fold: FoldFn,
}

/// How a registered function maps a batch and folds it with another registered function.
pub type FoldFn = fn(&[u8], &RemoteEntry, &mut Vec<u8>) -> Result<(), CallError>;

/// The `call` of a [`RemoteEntry`].
pub type CallFn = fn(&[u8], Option<Bulk>, &mut Vec<u8>) -> Result<Option<HeldWords>, CallError>;

/// Builds the registry entry of `F` (used by `#[remote]`).
pub const fn entry<F: RemoteFn>(signature: &'static str) -> RemoteEntry {
    RemoteEntry { name: F::NAME, signature, call: run_call::<F>, batch: run_batch::<F>, fold: run_fold::<F> }
}

#[linkme::distributed_slice]
/// Every `#[remote]` function of the program.
pub static REMOTE_FUNCTIONS: [RemoteEntry];

struct Table {
    /// Sorted by id (ids are hashes already: a binary search beats hashing them again). Each
    /// with its entry's `call` at hand: a call then reads no line of the entries' section.
    by_id: Vec<(u64, CallFn, &'static RemoteEntry)>,
    hash: u64,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut entries: Vec<&'static RemoteEntry> = REMOTE_FUNCTIONS.iter().collect();
        entries.sort_by_key(|e| e.name);
        let mut hasher = Fnv::default();
        for e in &entries {
            hasher.write(e.name.as_bytes());
            hasher.write(b"\0");
            hasher.write(e.signature.as_bytes());
            hasher.write(b"\0");
        }
        let mut by_id: Vec<_> = entries.into_iter().map(|e| (fn_id(e.name), e.call, e)).collect();
        by_id.sort_by_key(|&(id, ..)| id);
        if let Some(pair) = by_id.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            panic!("two remote functions hash to the same id: {} and {}; rename one", pair[0].2.name, pair[1].2.name);
        }
        Table { by_id, hash: hasher.0 }
    })
}

/// Looks a function up by id.
pub fn lookup(id: u64) -> Option<&'static RemoteEntry> {
    find(id).map(|&(_, _, entry)| entry)
}

/// The `call` of function `id`, without a look at its entry.
pub(crate) fn lookup_call(id: u64) -> Option<CallFn> {
    find(id).map(|&(_, call, _)| call)
}

/// Brings the table a call's function is looked up in into the caches (its first 2 KiB:
/// the whole table of most programs), so that the lookup's probes miss at once, not in turn.
#[inline]
pub(crate) fn prefetch() {
    let by_id = &table().by_id;
    crate::sys::prefetch(by_id.as_ptr(), std::mem::size_of_val(&by_id[..]).min(2048));
}

fn find(id: u64) -> Option<&'static (u64, CallFn, &'static RemoteEntry)> {
    let by_id = &table().by_id;
    by_id.binary_search_by_key(&id, |&(id, ..)| id).ok().map(|at| &by_id[at])
}

/// Hash of the whole table (names and signatures), part of the build fingerprint.
pub fn registry_hash() -> u64 {
    table().hash
}

/// Streaming FNV-1a.
pub(crate) struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

thread_local! {
    static IN_REMOTE: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic into a [`CallError`] with its message and location. While a
/// remote function runs, the panic is reported to the caller instead of printed here.
#[remote_path]
pub(crate) fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, CallError> {
    let was = entering_remote();
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_REMOTE.with(|c| c.set(was));
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(message)) => Err(CallError { message, location: None }),
        Err(payload) => {
            let (message, location) = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| (panic_message(&*payload), None));
            Err(CallError { message, location })
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".into()
    }
}

/// Marks this thread as running a remote function (returns what it was), with the panic
/// hook installed. Apart from the generic [`catch`]: code generic over a user's function is
/// compiled in the user's crate, and reaches this crate's statics there through the GOT,
/// one more page per call.
#[inline(never)]
#[call_path]
fn entering_remote() -> bool {
    install_panic_hook();
    IN_REMOTE.with(|c| c.replace(true))
}

#[inline]
fn install_panic_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_REMOTE.with(|c| c.get()) {
                let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
                LAST_PANIC.with(|p| *p.borrow_mut() = Some((panic_message(info.payload()), location)));
            } else {
                previous(info);
            }
        }));
    });
}

#[remote_path]
fn run_call<F: RemoteFn>(payload: &[u8], words: Option<Bulk>, out: &mut Vec<u8>) -> Result<Option<HeldWords>, CallError> {
    let args: F::Args = codec::decode_with(payload, words).map_err(|e| CallError { message: format!("cannot decode the arguments: {e}"), location: None })?;
    encode_result(catch(|| F::invoke(args))?, out)
}

/// Encodes a call's result into `out`, except the words of a vector of plain numbers big
/// enough to travel apart (see `Header::words`): those are sent from where the value holds
/// them.
pub fn encode_result<T: Serialize + Any>(value: T, out: &mut Vec<u8>) -> Result<Option<HeldWords>, CallError> {
    codec::encode_held_into(value, out, codec::BULK_FROM).map_err(|e| CallError { message: format!("cannot encode the result: {e}"), location: None })
}

/// The first byte of a batch's reply when every item succeeded: the values follow as one
/// vector (one block, for plain numbers).
const ALL_OK: u8 = 0;
/// The first byte of a batch's reply when some item failed: every item's result follows.
const EACH: u8 = 1;

/// A batch's results as its reply carries them.
#[derive(Debug)]
pub enum BatchResults<T> {
    /// Every item succeeded: the values, in order.
    AllOk(Vec<T>),
    /// Some failed: every item's result, in order.
    Each(Vec<Result<T, CallError>>),
}

impl<T: DeserializeOwned + Any> BatchResults<T> {
    /// Decodes a batch's reply.
    pub fn decode(payload: &[u8]) -> crate::error::Result<BatchResults<T>> {
        match payload.split_first() {
            Some((&ALL_OK, values)) => codec::decode(values).map(BatchResults::AllOk),
            Some((&EACH, results)) => codec::decode(results).map(BatchResults::Each),
            _ => Err(crate::error::Error::Codec("a batch reply must start with 0 or 1".into())),
        }
    }

    /// Items in the batch.
    pub fn len(&self) -> usize {
        match self {
            BatchResults::AllOk(values) => values.len(),
            BatchResults::Each(results) => results.len(),
        }
    }
}

fn run_batch<F: RemoteFn>(payload: &[u8], out: &mut Vec<u8>) -> Result<(), CallError> {
    let items: Vec<F::Args> = codec::decode(payload).map_err(|e| CallError { message: format!("cannot decode the batch: {e}"), location: None })?;
    let encode_error = |e| CallError { message: format!("cannot encode the results: {e}"), location: None };
    let mut values = Vec::with_capacity(items.len());
    let mut items = items.into_iter();
    while let Some(args) = items.next() {
        match catch(|| F::invoke(args)) {
            Ok(value) => values.push(value),
            Err(e) => {
                let mut results: Vec<Result<F::Output, CallError>> = values.into_iter().map(Ok).collect();
                results.push(Err(e));
                results.extend(items.map(|args| catch(|| F::invoke(args))));
                out.push(EACH);
                return codec::encode_into(&results, out).map_err(encode_error);
            }
        }
    }
    out.push(ALL_OK);
    codec::encode_value_into(&values, out).map_err(encode_error)
}

fn run_fold<F: RemoteFn>(payload: &[u8], op: &RemoteEntry, out: &mut Vec<u8>) -> Result<(), CallError> {
    let codec_error = |what: &str, e: crate::error::Error| CallError { message: format!("cannot {what}: {e}"), location: None };
    let items: Vec<F::Args> = codec::decode(payload).map_err(|e| codec_error("decode the batch", e))?;
    let (mut pair, mut folded) = (Vec::new(), Vec::new());
    let mut acc: Option<F::Output> = None;
    for args in items {
        let value = catch(|| F::invoke(args))?;
        acc = Some(match acc.take() {
            None => value,
            Some(left) => {
                // `op` takes two results: it is typed so at the call site (Cluster::map_reduce)
                pair.clear();
                folded.clear();
                codec::encode_into(&(left, value), &mut pair).map_err(|e| codec_error("encode two results", e))?;
                if let Some(words) = (op.call)(&pair, None, &mut folded)? {
                    words.append_to(&mut folded);
                }
                codec::decode(&folded).map_err(|e| codec_error("decode a folded result", e))?
            }
        });
    }
    codec::encode_into(&acc, out).map_err(|e| codec_error("encode the folded result", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_hashes_of_names() {
        assert_eq!(fn_id(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fn_id("a::f"), fn_id("b::f"));
    }

    #[test]
    fn catch_reports_panic_message_and_location() {
        let err = catch::<()>(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(err.message, "boom 7");
        assert!(err.location.unwrap().contains("registry.rs"));
        let err = catch::<()>(|| Err("returned".into())).unwrap_err();
        assert_eq!((err.message.as_str(), err.location), ("returned", None));
    }
}
