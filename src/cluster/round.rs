//! An `everywhere` round: one call to each worker, the replies taken as they come, each by
//! its worker's place in the round. A round has no slot per call, and decodes a small reply
//! where it arrives, so that reply's buffer serves the next one: a round over a thousand
//! workers holds no thousand frames, and allocates none of them.

use std::any::Any;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::ids::Pid;
use crate::protocol::Frame;
use crate::sys::Hint;
use crate::transport::io;

use super::Cluster;
use super::future::decode_reply;
use super::slot::{Gather, Slot, Waiter};

/// Replies with a payload at most this big are decoded on the thread that reads them;
/// bigger ones by the caller, so that the thread that reads connections is not held up.
const DECODED_ON_ARRIVAL: usize = 64 << 10;

/// What came from one worker. What is rare is boxed: a round holds one of these per worker,
/// and touches each, so a small one (two words for a no-op's reply) spares lines.
enum Arrived<R> {
    Decoded(Result<R, Box<Error>>),
    Frame(Box<Result<Frame>>),
    /// Decoding panicked (a hand-written `Deserialize`): the caller panics with it, as a
    /// caller that decodes its own reply does.
    Panicked(Box<Box<dyn Any + Send>>),
}

struct Round<R> {
    state: Mutex<State<R>>,
    /// Filled once every reply is in: the caller waits on it as on one call (all the ways a
    /// thread can wait are there). What it is filled with is never read.
    done: Arc<Slot>,
}

struct State<R> {
    arrived: Vec<Option<Arrived<R>>>,
    left: usize,
}

impl<R: DeserializeOwned + Send + 'static> Gather for Round<R> {
    fn deliver(&self, index: usize, result: Result<Frame>) {
        let small = result.as_ref().map_or(true, |frame| frame.payload().len() <= DECODED_ON_ARRIVAL);
        let arrived = match small {
            true => match catch_unwind(AssertUnwindSafe(|| decode_reply(result))) {
                Ok(decoded) => Arrived::Decoded(decoded.map_err(Box::new)),
                Err(panic) => Arrived::Panicked(Box::new(panic)),
            },
            false => Arrived::Frame(Box::new(result)),
        };
        let last = {
            let mut state = self.state.lock().expect("round lock");
            let Some(place) = state.arrived.get_mut(index).filter(|place| place.is_none()) else { return }; // first answer wins
            *place = Some(arrived);
            state.left -= 1;
            state.left == 0
        };
        if last {
            self.done.fill(Err(Error::ShutDown));
        }
    }
}

/// Calls function `func` with the encoded arguments `payload` on every worker at once;
/// results by pid. The first failure (by pid) is returned, after every call has ended.
pub(crate) fn everywhere<R: DeserializeOwned + Send + 'static>(cluster: &Cluster, func: u64, payload: &[u8]) -> Result<BTreeMap<Pid, R>> {
    // on the master, the workers' entries: a call to each then needs no search for it
    let entries = cluster.inner.master.as_ref().map(|m| m.worker_entries());
    let pids = match &entries {
        Some(entries) => entries.iter().map(|&(pid, _)| pid).collect(),
        None => cluster.workers(),
    };
    if pids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let round = Arc::new(Round { state: Mutex::new(State { arrived: pids.iter().map(|_| None).collect(), left: pids.len() }), done: Arc::default() });
    {
        // this thread reads the replies when it waits: the I/O thread need not meanwhile
        let _waiting = Slot::waits_driving().then(io::about_to_wait);
        let call = |index: usize, pid: Pid| -> Result<()> {
            let waiter = Waiter::Gather(round.clone(), index);
            match &entries {
                Some(entries) => cluster.call_entry_encoded(&entries[index].1, pid, func, payload, waiter),
                None => cluster.call_encoded(pid, func, payload, waiter).map(drop),
            }
        };
        for (index, &pid) in pids.iter().enumerate() {
            if let Some(entries) = &entries {
                // each worker's state lies cold (the workers that ran since evicted it): its
                // entry is fetched two calls ahead, what the call reads through it one ahead
                if let Some((_, later)) = entries.get(index + 2) {
                    Hint::of(&**later).prefetch();
                }
                if let Some((_, next)) = entries.get(index + 1) {
                    next.prefetch_for_call();
                }
            }
            if let Err(e) = call(index, pid) {
                round.deliver(index, Err(e)); // not sent: nobody else will tell of it
            }
        }
        drop(entries); // while their lines are warm from the sends
        let _ = round.done.wait(None);
    }
    let arrived = std::mem::take(&mut round.state.lock().expect("round lock").arrived);
    let mut results = Vec::with_capacity(pids.len());
    let mut first_error = None;
    for (pid, arrived) in pids.into_iter().zip(arrived) {
        let result = match arrived.expect("the round is done: every reply is in") {
            Arrived::Decoded(result) => result.map_err(|e| *e),
            Arrived::Frame(frame) => decode_reply(*frame),
            Arrived::Panicked(panic) => resume_unwind(*panic),
        };
        match result {
            Ok(v) => results.push((pid, v)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // in pid order already: the map is built in one pass, not by a search per worker
    first_error.map_or_else(|| Ok(results.into_iter().collect()), Err)
}
