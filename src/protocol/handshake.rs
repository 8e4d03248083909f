//! The dial-in handshake: the worker sends one [`Hello`]; the master answers one [`Welcome`].
//!
//! Both start with a magic and the protocol version in fixed positions, so that peers of
//! different versions still understand each other's refusal.

use serde::{Deserialize, Serialize};

use crate::Pid;
use crate::codec;

/// Version of this protocol; peers of another version are refused, naming both.
pub const PROTOCOL_VERSION: u16 = 1;
/// First bytes of both handshake messages.
pub const MAGIC: [u8; 4] = *b"CMAN";
/// Largest handshake message accepted (a hello is a few hundred bytes).
pub const MAX_HANDSHAKE: usize = 64 * 1024;

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

    /// Hex form, as passed to workers in their environment.
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

    /// Compares in constant time, so response timing tells an attacker nothing.
    pub fn matches(&self, other: &Secret) -> bool {
        let diff = self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl Hello {
    /// The whole message, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(&MAGIC);
        body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        codec::encode_into(self, &mut body).expect("a Hello always encodes");
        prefixed(body)
    }
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
    fn anonymous(reason: String) -> Refusal {
        Refusal { reason, launch: None }
    }
}

/// Master to worker: the pid given, or the reason for refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    /// Accepted as `pid`; `direct_links`: workers may connect to each other directly.
    Accepted {
        /// The pid given (or, from a peer, the peer's own pid).
        pid: Pid,
        /// All-to-all topology: open a peer listener and dial other workers directly.
        direct_links: bool,
    },
    /// Refused; the text says why and what to do.
    Refused(String),
}

impl Welcome {
    /// The whole message, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&MAGIC);
        body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        match self {
            Welcome::Accepted { pid, direct_links } => {
                body.push(1);
                body.extend_from_slice(&pid.to_le_bytes());
                body.push(u8::from(*direct_links));
            }
            Welcome::Refused(reason) => {
                body.push(0);
                body.extend_from_slice(reason.as_bytes());
            }
        }
        prefixed(body)
    }

    /// Parses a welcome body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<Welcome, String> {
        let (version, rest) = split_magic(body)?;
        match rest.first() {
            Some(1) if rest.len() == 6 => Ok(Welcome::Accepted { pid: Pid::from_le_bytes(rest[1..5].try_into().expect("4 bytes")), direct_links: rest[5] == 1 }),
            Some(0) => Ok(Welcome::Refused(String::from_utf8_lossy(&rest[1..]).into_owned())),
            _ if version != PROTOCOL_VERSION => Err(version_mismatch(PROTOCOL_VERSION, version)),
            _ => Err("malformed welcome from the master".into()),
        }
    }
}

fn prefixed(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
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
/// fingerprint. The order matters: nothing about us is revealed before the secret matched.
pub fn check_hello(body: &[u8], secret: &Secret, mine: &Fingerprint, my_exe: &str) -> Result<Hello, Refusal> {
    let (version, rest) = split_magic(body).map_err(Refusal::anonymous)?;
    if version != PROTOCOL_VERSION {
        return Err(Refusal::anonymous(format!(
            "protocol version mismatch: master speaks {PROTOCOL_VERSION}, worker speaks {version}; build master and workers from the same clusterman version"
        )));
    }
    let hello: Hello = codec::decode(rest).map_err(|e| Refusal::anonymous(format!("malformed hello: {e}")))?;
    if !hello.secret.matches(secret) {
        return Err(Refusal::anonymous(format!(
            "wrong secret from {} (os pid {}): the worker was not started by this master, or with a stale CLUSTERMAN_SECRET",
            hello.host, hello.os_pid
        )));
    }
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
        Hello { secret, fingerprint: fp(registry), exe: "/bin/w".into(), launch: Some((9, 2)), host: "h".into(), os_pid: 77, mpi: Some((2, 4)), peer: None }
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
    fn wrong_secret_is_refused_without_revealing_ours() {
        let s = Secret::random();
        let other = Secret([0; 16]);
        let err = check_hello(body(&hello(other, 1).encode()), &s, &fp(1), "/bin/m").unwrap_err().reason;
        assert!(err.contains("wrong secret"), "{err}");
        assert!(!err.contains(&s.to_hex()));
        assert!(!err.contains("registry"), "the fingerprint must not leak before the secret matched: {err}");
        let refusal = check_hello(body(&hello(other, 1).encode()), &s, &fp(1), "/bin/m").unwrap_err();
        assert_eq!(refusal.launch, None, "an unproven launch claim is not trusted");
    }

    #[test]
    fn fingerprint_mismatch_names_both() {
        let s = Secret::random();
        let err = check_hello(body(&hello(s, 0xaa).encode()), &s, &fp(0xbb), "/bin/m").unwrap_err().reason;
        assert!(err.contains("00000000000000aa") && err.contains("00000000000000bb"), "{err}");
        assert!(err.contains("/bin/w") && err.contains("/bin/m"), "{err}");
        assert_eq!(check_hello(body(&hello(s, 0xaa).encode()), &s, &fp(0xbb), "/bin/m").unwrap_err().launch, Some(9));
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
    fn garbage_is_refused() {
        let s = Secret::random();
        assert!(check_hello(b"GET / HTTP/1.1\r\n", &s, &fp(1), "m").unwrap_err().reason.contains("bad magic"));
        let mut msg = hello(s, 1).encode();
        msg.truncate(30);
        assert!(check_hello(body(&msg), &s, &fp(1), "m").unwrap_err().reason.contains("malformed hello"));
    }

    #[test]
    fn welcome_round_trips() {
        for w in [Welcome::Accepted { pid: 5, direct_links: true }, Welcome::Accepted { pid: 6, direct_links: false }, Welcome::Refused("no".into())] {
            assert_eq!(Welcome::decode(body(&w.encode())).unwrap(), w);
        }
    }

    #[test]
    fn secret_hex_round_trip_and_constant_time_compare() {
        let s = Secret::random();
        assert!(Secret::from_hex(&s.to_hex()).unwrap().matches(&s));
        assert!(Secret::from_hex("zz").is_none());
        let mut t = s;
        t.0[15] ^= 1;
        assert!(!t.matches(&s));
    }
}
