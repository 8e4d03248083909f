//! What the fuzz harness (`tests/fuzz.rs`, `scripts/fuzz.sh`) drives: every decoder that
//! reads bytes from a peer, and valid messages to start mutating from. Not a public API.

use std::collections::{BTreeMap, HashMap};

use crate::protocol::failure::Failure;
use crate::codec;
use crate::error::RemoteError;
use crate::protocol::{self, Fingerprint, FrameBuf, FrameReader, Header, Hello, Kind, Liveness, Secret, Terms, Welcome, check_hello};
use crate::registry::CallError;

/// The secret the samples carry and the checks expect.
const SECRET: Secret = Secret([0x42; 16]);

fn fingerprint() -> Fingerprint {
    Fingerprint { registry: 0x1234_5678_9abc_def0, build: "0123456789abcdef0123456789abcdef01234567".into() }
}

/// Feeds `bytes` to every decoder of untrusted input: the frame reader and header, the
/// hello (as sent, and with the secret patched in so the fields behind it are decoded too),
/// the welcome, the failure and batch payloads, and typical payload types.
pub fn decode_untrusted(bytes: &[u8]) {
    let mut reader = FrameReader::new(protocol::DEFAULT_MAX_FRAME);
    reader.extend(bytes);
    while let Ok(Some(frame)) = reader.next_frame() {
        let _ = frame.payload();
    }
    let _ = reader.end_of_stream();
    let _ = Header::parse(bytes);
    let _ = check_hello(bytes, &SECRET, &fingerprint(), "/bin/master");
    if bytes.len() >= 22 {
        let mut authenticated = bytes.to_vec();
        authenticated[..4].copy_from_slice(&protocol::MAGIC);
        authenticated[4..6].copy_from_slice(&protocol::PROTOCOL_VERSION.to_le_bytes());
        authenticated[6..22].copy_from_slice(&SECRET.0);
        let _ = check_hello(&authenticated, &SECRET, &fingerprint(), "/bin/master");
    }
    let _ = Welcome::decode(bytes);
    let _ = codec::decode::<Failure>(bytes);
    let _ = codec::decode::<Vec<Result<String, CallError>>>(bytes);
    let _ = codec::decode::<Vec<(u64, String, Vec<f64>)>>(bytes);
    let _ = codec::decode::<(Vec<u8>, Option<char>, bool, i128)>(bytes);
    let _ = codec::decode::<BTreeMap<String, Vec<Option<u32>>>>(bytes);
    let _ = codec::decode::<HashMap<u16, (String, Box<[u64]>)>>(bytes);
    let _ = codec::decode::<Vec<f64>>(bytes); // these two are copied as one block
    let _ = codec::decode::<(Vec<u8>,)>(bytes);
    let _ = std::str::from_utf8(bytes).map(protocol::env::parse_launch);
    #[cfg(feature = "mpi")]
    crate::mpi::decode_untrusted(bytes);
}

/// One valid example of every message [`decode_untrusted`] reads.
pub fn sample_messages() -> Vec<Vec<u8>> {
    let hello = Hello {
        secret: SECRET,
        fingerprint: fingerprint(),
        exe: "/home/user/bin/sim".into(),
        launch: Some((99, 3)),
        host: "node17".into(),
        os_pid: 31337,
        mpi: Some((3, 8)),
        peer: None,
        problem: None,
    };
    let frame = |kind: Kind, payload: &[u8]| {
        let mut f = FrameBuf::new(Header { kind, src: 3, dst: 1, req: 9, func: 0xfeed, words: 0 });
        f.payload().extend_from_slice(payload);
        f.finish().expect("small frame")
    };
    let failure = Failure::Remote(RemoteError { pid: 3, function: "sim::step".into(), message: "boom".into(), location: Some("src/x.rs:1:2".into()) });
    let batch: Vec<Result<String, CallError>> = vec![Ok("a".into()), Err(CallError { message: "bad".into(), location: None })];
    #[cfg_attr(not(feature = "mpi"), allow(unused_mut))]
    let mut samples = vec![
        hello.encode()[4..].to_vec(),
        Welcome::Accepted(Terms { pid: 3, direct_links: true, max_frame: 1 << 30, liveness: Liveness::default() }).encode()[4..].to_vec(),
        Welcome::Refused("no".into()).encode()[4..].to_vec(),
        frame(Kind::Call, &codec::encode(&(7u64, "x".to_string(), vec![1.5f64])).expect("encodes")),
        [frame(Kind::Heartbeat, &[]), frame(Kind::Output, b"line one\nline two")].concat(),
        codec::encode(&failure).expect("encodes"),
        codec::encode(&batch).expect("encodes"),
        codec::encode(&vec![(1u64, "s".to_string(), vec![0.5f64; 3])]).expect("encodes"),
        codec::encode(&(vec![1u8, 2], Some('λ'), true, -5i128)).expect("encodes"),
        codec::encode(&vec![0.5f64, 2.0]).expect("encodes"),
        b"123:rank".to_vec(),
    ];
    #[cfg(feature = "mpi")]
    samples.extend(crate::mpi::sample_messages());
    samples
}
