//! The dial-in handshake: the worker sends one [`Hello`]; the master answers one [`Welcome`].
//!
//! Both start with a magic and the protocol version in fixed positions, so that peers of
//! different versions still understand each other's refusal. The secret follows at a fixed
//! offset and is compared (in constant time) before any variable-length field is decoded:
//! nothing an unauthenticated peer sends is parsed beyond 22 fixed bytes.

use std::time::Duration;

use super::frame;
use super::liveness::Liveness;

use serde::{Deserialize, Serialize};

use crate::ids::Pid;
use crate::codec;

/// Version of this protocol; peers of another version are refused, naming both.
pub const PROTOCOL_VERSION: u16 = 2;
/// First bytes of both handshake messages.
pub const MAGIC: [u8; 4] = *b"CMAN";
/// Largest handshake message accepted (a hello is a few hundred bytes).
pub const MAX_HANDSHAKE: usize = 16 * 1024;
/// Magic, version and secret: the part of a hello checked before anything is decoded.
const HELLO_FIXED: usize = 4 + 2 + 16;
/// Longest host name and executable path a hello carries (longer ones are cut).
const MAX_HOST: usize = 255;
const MAX_EXE: usize = 4096;

/// The cluster secret: 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(pub [u8; 16]);

impl Secret {
    /// A new random secret from the operating system.
    pub fn random() -> Secret {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the operating system has no random source");
        Secret(b)
    }

    /// Hex form, as handed to workers.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the hex form.
    pub fn from_hex(s: &str) -> Option<Secret> {
        let s = s.trim();
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Secret(b))
    }

    /// A secret of the user's choosing (Julia's cluster cookie): 8 to 16 printable ASCII
    /// characters without spaces, padded to 16 bytes as Julia pads its cookie. Shorter ones
    /// are refused (a guess would open the cluster), as are longer ones (the hello carries 16
    /// bytes).
    pub fn from_cookie(cookie: &str) -> std::result::Result<Secret, String> {
        let n = cookie.len();
        if !(COOKIE_MIN..=COOKIE_LEN).contains(&n) || !cookie.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "a cookie is {COOKIE_MIN} to {COOKIE_LEN} printable ASCII characters without spaces (this one has {n}{}); choose another",
                if cookie.bytes().all(|b| b.is_ascii_graphic()) { "" } else { ", some not printable or spaces" }
            ));
        }
        let mut b = [b' '; COOKIE_LEN];
        b[..n].copy_from_slice(cookie.as_bytes());
        Ok(Secret(b))
    }

    /// The hex form, or else a cookie (see [`Secret::from_cookie`]): what a worker finds in
    /// its environment or secret file.
    pub fn parse(s: &str) -> Option<Secret> {
        let s = s.trim();
        Secret::from_hex(s).or_else(|| Secret::from_cookie(s).ok())
    }

    /// Compares in constant time, so response timing tells an attacker nothing.
    pub fn matches(&self, other: &Secret) -> bool {
        let diff = self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// The longest cookie: the hello's 16 secret bytes.
const COOKIE_LEN: usize = 16;
/// The shortest cookie taken.
const COOKIE_MIN: usize = 8;

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)") // never printed
    }
}

/// What makes two processes "the same program": the remote-function table and the binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Hash of the sorted (name, signature) list of registered functions.
    pub registry: u64,
    /// ELF build id of the executable (or a hash of its bytes when it has none).
    pub build: String,
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registry {:016x}, build {}", self.registry, self.build)
    }
}

/// Worker to master: who I am.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The secret the worker was given.
    pub secret: Secret,
    /// The worker's build fingerprint.
    pub fingerprint: Fingerprint,
    /// Path of the worker's executable (for error messages).
    pub exe: String,
    /// Which launch started this worker and its index in it (`None`: joined by itself).
    pub launch: Option<(u64, u32)>,
    /// Host name of the worker.
    pub host: String,
    /// Operating-system process id of the worker.
    pub os_pid: u32,
    /// MPI rank and world size, when the worker is an MPI process.
    pub mpi: Option<(i32, i32)>,
    /// Set when a worker dials another worker directly (all-to-all topology): its own pid.
    pub peer: Option<Pid>,
    /// Set when the process cannot serve and says why (the program never called
    /// `clusterman::init()`): the master fails the launch at once with this text.
    pub problem: Option<String>,
}

/// The part of a hello after the secret, as encoded.
type HelloRest = (Fingerprint, String, Option<(u64, u32)>, String, u32, Option<(i32, i32)>, Option<Pid>, Option<String>);

impl Hello {
    /// The whole message, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(&MAGIC);
        body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        body.extend_from_slice(&self.secret.0);
        let problem = self.problem.as_deref().map(|p| cut(p, MAX_EXE));
        let rest: HelloRest =
            (self.fingerprint.clone(), cut(&self.exe, MAX_EXE), self.launch, cut(&self.host, MAX_HOST), self.os_pid, self.mpi, self.peer, problem);
        codec::encode_into(&rest, &mut body).expect("a Hello always encodes");
        frame::prefixed(&body).expect("a handshake message is small")
    }
}

/// `s`, cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Why the master refused a worker; sent back to the worker and logged by the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What was wrong and what to do.
    pub reason: String,
    /// The launch the worker belongs to, when it proved the secret (so the claim is
    /// trustworthy and that launch can fail at once instead of waiting for its timeout).
    pub launch: Option<u64>,
}

impl Refusal {
    /// A refusal that names no launch (the peer did not prove the secret).
    pub fn anonymous(reason: impl Into<String>) -> Refusal {
        Refusal { reason: reason.into(), launch: None }
    }
}

/// What an admitted worker is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// The pid given (or, from a peer, the peer's own pid).
    pub pid: Pid,
    /// All-to-all topology: open a peer listener and dial other workers directly.
    pub direct_links: bool,
    /// Largest frame the cluster accepts (the worker honours it in both directions).
    pub max_frame: usize,
    /// The cluster's heartbeats.
    pub liveness: Liveness,
}

/// Master to worker: the terms of admission, or the reason for refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    /// Accepted on these terms.
    Accepted(Terms),
    /// Refused; the text says why and what to do.
    Refused(String),
}

/// Bytes of an accepted welcome after the magic and version.
const ACCEPTED_LEN: usize = 1 + 4 + 1 + 8 + 4 + 4;

impl Welcome {
    /// The whole message, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&MAGIC);
        body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        match self {
            Welcome::Accepted(t) => {
                body.push(1);
                body.extend_from_slice(&t.pid.to_le_bytes());
                body.push(u8::from(t.direct_links));
                body.extend_from_slice(&(t.max_frame as u64).to_le_bytes());
                body.extend_from_slice(&millis(t.liveness.interval).to_le_bytes());
                body.extend_from_slice(&millis(t.liveness.timeout).to_le_bytes());
            }
            Welcome::Refused(reason) => {
                body.push(0);
                body.extend_from_slice(cut(reason, MAX_HANDSHAKE - 16).as_bytes());
            }
        }
        frame::prefixed(&body).expect("a handshake message is small")
    }

    /// Parses a welcome body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<Welcome, String> {
        let (version, rest) = split_magic(body)?;
        let u32_at = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().expect("4 bytes"));
        match rest.first() {
            Some(1) if rest.len() == ACCEPTED_LEN && version == PROTOCOL_VERSION => {
                let max_frame = u64::from_le_bytes(rest[6..14].try_into().expect("8 bytes"));
                Ok(Welcome::Accepted(Terms {
                    pid: u32_at(1),
                    direct_links: rest[5] == 1,
                    max_frame: usize::try_from(max_frame).unwrap_or(usize::MAX),
                    liveness: Liveness { interval: Duration::from_millis(u32_at(14).into()), timeout: Duration::from_millis(u32_at(18).into()) },
                }))
            }
            Some(0) => Ok(Welcome::Refused(String::from_utf8_lossy(&rest[1..]).into_owned())),
            _ if version != PROTOCOL_VERSION => Err(version_mismatch(PROTOCOL_VERSION, version)),
            _ => Err("malformed welcome from the master".into()),
        }
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn split_magic(body: &[u8]) -> Result<(u16, &[u8]), String> {
    if body.len() < 6 || body[..4] != MAGIC {
        return Err("not a clusterman peer (bad magic): is something else listening on this port?".into());
    }
    Ok((u16::from_le_bytes([body[4], body[5]]), &body[6..]))
}

fn version_mismatch(mine: u16, theirs: u16) -> String {
    format!("protocol version mismatch: this side speaks {mine}, the peer speaks {theirs}; build master and workers from the same clusterman version")
}

/// Master side: checks a hello body (without its length prefix) against our secret and
/// fingerprint. The order matters: the secret, at a fixed offset, is compared before any
/// field of variable length is decoded, and nothing about us is revealed before it matched.
pub fn check_hello(body: &[u8], secret: &Secret, mine: &Fingerprint, my_exe: &str) -> Result<Hello, Refusal> {
    let (version, _) = split_magic(body).map_err(Refusal::anonymous)?;
    if version != PROTOCOL_VERSION {
        return Err(Refusal::anonymous(format!(
            "protocol version mismatch: master speaks {PROTOCOL_VERSION}, worker speaks {version}; build master and workers from the same clusterman version"
        )));
    }
    if body.len() < HELLO_FIXED {
        return Err(Refusal::anonymous(format!("hello of {} bytes is too short to hold a secret", body.len())));
    }
    let theirs = Secret(body[6..HELLO_FIXED].try_into().expect("16 bytes"));
    if !theirs.matches(secret) {
        return Err(Refusal::anonymous(
            "wrong secret: the worker was not started by this master, or with a stale secret (CLUSTERMAN_SECRET or CLUSTERMAN_SECRET_FILE)",
        ));
    }
    let (fingerprint, exe, launch, host, os_pid, mpi, peer, problem): HelloRest =
        codec::decode(&body[HELLO_FIXED..]).map_err(|e| Refusal::anonymous(format!("malformed hello: {e}")))?;
    let hello = Hello { secret: theirs, fingerprint, exe, launch, host, os_pid, mpi, peer, problem };
    if hello.fingerprint != *mine {
        return Err(Refusal {
            reason: format!(
                "build fingerprint mismatch: worker {} ({}) has [{}], master {my_exe} has [{mine}]; start workers from the master's own binary",
                hello.host, hello.exe, hello.fingerprint
            ),
            launch: hello.launch.map(|(id, _)| id),
        });
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(registry: u64) -> Fingerprint {
        Fingerprint { registry, build: "abc".into() }
    }

    fn hello(secret: Secret, registry: u64) -> Hello {
        Hello { secret, fingerprint: fp(registry), exe: "/bin/w".into(), launch: Some((9, 2)), host: "h".into(), os_pid: 77, mpi: Some((2, 4)), peer: None, problem: None }
    }

    fn body(msg: &[u8]) -> &[u8] {
        &msg[4..]
    }

    #[test]
    fn good_hello_is_accepted() {
        let s = Secret::random();
        let h = hello(s, 1);
        assert_eq!(check_hello(body(&h.encode()), &s, &fp(1), "/bin/m").unwrap(), h);
    }

    #[test]
    fn the_secret_sits_at_a_fixed_offset() {
        let s = Secret::random();
        let msg = hello(s, 1).encode();
        assert_eq!(&body(&msg)[6..22], &s.0);
    }

    #[test]
    fn wrong_secret_is_refused_before_anything_is_decoded() {
        let s = Secret::random();
        let mut msg = hello(Secret([0; 16]), 1).encode();
        let err = check_hello(body(&msg), &s, &fp(1), "/bin/m").unwrap_err();
        assert!(err.reason.contains("wrong secret"), "{}", err.reason);
        assert!(!err.reason.contains(&s.to_hex()) && !err.reason.contains("registry"), "nothing about us leaks: {}", err.reason);
        assert_eq!(err.launch, None, "an unproven launch claim is not trusted");
        // a lying length field after a wrong secret is never looked at
        msg.truncate(4 + 22);
        msg.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(check_hello(body(&msg), &s, &fp(1), "/bin/m").unwrap_err().reason.contains("wrong secret"));
    }

    #[test]
    fn a_lying_length_after_the_right_secret_is_a_refusal_not_an_allocation() {
        let s = Secret::random();
        let mut msg = hello(s, 1).encode();
        msg.truncate(4 + 22);
        msg.extend_from_slice(&(1u64 << 40).to_le_bytes()); // the fingerprint's build string
        msg.extend_from_slice(b"xy");
        let err = check_hello(body(&msg), &s, &fp(1), "/bin/m").unwrap_err().reason;
        assert!(err.contains("malformed hello"), "{err}");
    }

    #[test]
    fn fingerprint_mismatch_names_both() {
        let s = Secret::random();
        let refusal = check_hello(body(&hello(s, 0xaa).encode()), &s, &fp(0xbb), "/bin/m").unwrap_err();
        let err = &refusal.reason;
        assert!(err.contains("00000000000000aa") && err.contains("00000000000000bb"), "{err}");
        assert!(err.contains("/bin/w") && err.contains("/bin/m"), "{err}");
        assert_eq!(refusal.launch, Some(9));
    }

    #[test]
    fn version_mismatch_names_both() {
        let s = Secret::random();
        let mut msg = hello(s, 1).encode();
        msg[8..10].copy_from_slice(&7u16.to_le_bytes());
        let err = check_hello(body(&msg), &s, &fp(1), "/bin/m").unwrap_err().reason;
        assert!(err.contains(&format!("master speaks {PROTOCOL_VERSION}")) && err.contains("worker speaks 7"), "{err}");
    }

    #[test]
    fn garbage_and_short_hellos_are_refused() {
        let s = Secret::random();
        assert!(check_hello(b"GET / HTTP/1.1\r\n", &s, &fp(1), "m").unwrap_err().reason.contains("bad magic"));
        let msg = hello(s, 1).encode();
        assert!(check_hello(&body(&msg)[..12], &s, &fp(1), "m").unwrap_err().reason.contains("too short"));
        assert!(check_hello(&body(&msg)[..30], &s, &fp(1), "m").unwrap_err().reason.contains("malformed hello"));
    }

    #[test]
    fn long_fields_are_cut_to_their_limits() {
        let s = Secret::random();
        let mut h = hello(s, 1);
        h.host = "é".repeat(1000);
        h.exe = "x".repeat(100_000);
        let msg = h.encode();
        assert!(msg.len() < MAX_HANDSHAKE);
        let back = check_hello(body(&msg), &s, &fp(1), "m").unwrap();
        assert!(back.host.len() <= MAX_HOST && back.exe.len() == MAX_EXE);
    }

    #[test]
    fn welcome_round_trips() {
        let terms = Terms { pid: 5, direct_links: true, max_frame: 1 << 30, liveness: Liveness { interval: Duration::from_millis(250), timeout: Duration::from_secs(3) } };
        for w in [Welcome::Accepted(terms), Welcome::Accepted(Terms { direct_links: false, ..terms }), Welcome::Refused("no".into())] {
            assert_eq!(Welcome::decode(body(&w.encode())).unwrap(), w);
        }
        assert!(Welcome::decode(&body(&Welcome::Accepted(terms).encode())[..10]).is_err());
    }

    #[test]
    fn secret_hex_round_trip_and_constant_time_compare() {
        let s = Secret::random();
        assert!(Secret::from_hex(&s.to_hex()).unwrap().matches(&s));
        assert!(Secret::from_hex("zz").is_none());
        assert!(Secret::parse(&format!(" {}\n", s.to_hex())).unwrap().matches(&s));
        let mut t = s;
        t.0[15] ^= 1;
        assert!(!t.matches(&s));
    }

    #[test]
    fn cookies_are_padded_like_julias_and_checked_for_length() {
        let c = Secret::from_cookie("my-cookie").unwrap();
        assert_eq!(&c.0, b"my-cookie       ");
        assert!(Secret::parse("my-cookie\n").unwrap().matches(&c));
        assert!(Secret::from_cookie("sixteen-chars-ok").is_ok());
        for bad in ["short", "seventeen-chars-x", "with space", "tab\tinside", "ünïcödé!"] {
            let err = Secret::from_cookie(bad).unwrap_err();
            assert!(err.contains("8 to 16 printable ASCII characters"), "{bad}: {err}");
        }
        assert!(Secret::parse("short").is_none());
    }
}
