//! A hostile network: crafted hellos (wrong secret, lengths of 2^40 and more, random
//! mutations, an old protocol) on every listener — the master's (also while an elastic manager
//! lets workers join) and a worker's peer listener — leave everything serving; a hello sent a byte at a time is cut at
//! the handshake deadline; a reply that lies about its lengths is an error, not an abort;
//! refusals are kept in bounded memory.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clusterman::launch::{ElasticAddress, ElasticManager};
use clusterman::prelude::*;
use clusterman::{Error, Topology};

clusterman::init_in_constructor!();

#[remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Runs on one worker: asks worker `other` directly (all-to-all topology).
#[remote]
fn add_via(other: Pid, a: i64, b: i64) -> Result<i64, String> {
    Cluster::current().ok_or("no cluster")?.remote_call_fetch(other, add, (a, b)).map_err(|e| e.to_string())
}

/// Sends the master a reply for request 1 (the first call on this link: this one) whose
/// string claims 2^60 bytes, then answers honestly (too late: the lie arrived first).
#[remote]
fn lie_about_lengths() -> String {
    let mut body = vec![4u8]; // Kind::Reply
    body.extend_from_slice(&my_id().to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes()); // request 1
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(1u64 << 60).to_le_bytes());
    body.extend_from_slice(b"tiny");
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    assert!(clusterman::__private::send_raw_to_master(&frame));
    "honest".into()
}

/// xorshift: deterministic mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn prefixed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A hello shaped like a real one (magic, version 2, a secret that is wrong, then fields
/// whose lengths claim `claim` bytes).
fn hello_claiming(claim: u64) -> Vec<u8> {
    let mut body = b"CMAN".to_vec();
    body.extend_from_slice(&2u16.to_le_bytes());
    body.extend_from_slice(&[0x5a; 16]); // not the secret
    body.extend_from_slice(&0xdead_beefu64.to_le_bytes()); // registry hash
    body.extend_from_slice(&claim.to_le_bytes()); // build id string
    body.extend_from_slice(b"abc");
    body.extend_from_slice(&claim.to_le_bytes()); // exe
    body.extend_from_slice(b"/x");
    prefixed(&body)
}

/// What an attacker sends: hellos of our own and of the old protocol claiming 2^40 and 2^60
/// bytes, a length prefix of 4 GiB, garbage, and 200 random mutations of a hello.
fn crafted() -> Vec<Vec<u8>> {
    let mut all = vec![hello_claiming(1 << 40), hello_claiming(1 << 60), hello_claiming(u64::MAX)];
    // protocol version 1 put bincode-encoded fields (secret included) right after the version
    let mut old = b"CMAN".to_vec();
    old.extend_from_slice(&1u16.to_le_bytes());
    old.extend_from_slice(&[7; 16]);
    old.extend_from_slice(&(1u64 << 40).to_le_bytes());
    old.extend_from_slice(&[1; 20]);
    all.push(prefixed(&old));
    all.push(u32::MAX.to_le_bytes().to_vec());
    all.push([u32::MAX.to_le_bytes().as_slice(), b"CMAN\x02\x00", &[0; 16]].concat());
    all.push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = hello_claiming(8);
    for _ in 0..200 {
        let mut m = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() as usize) % m.len();
            m[at] = rng.next() as u8;
        }
        if rng.next() % 4 == 0 {
            let at = 4 + (rng.next() as usize) % (m.len() - 12);
            m[at..at + 8].copy_from_slice(&(1u64 << (30 + rng.next() % 34)).to_le_bytes());
        }
        all.push(m);
    }
    all
}

/// Sends every crafted message to `addr`, each on its own connection, reading whatever
/// comes back until the other side closes (or 5 s pass).
fn attack(addr: SocketAddr) {
    for message in crafted() {
        let Ok(mut s) = TcpStream::connect(addr) else { continue };
        let _ = s.write_all(&message);
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
    }
}

fn still_serves(cluster: &Cluster) {
    let pids = cluster.add_procs(LocalManager::new(1)).expect("the master still accepts good workers");
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (2, 2)).unwrap(), 4);
}

#[test]
fn crafted_hellos_on_the_master_listener_leave_the_master_serving() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(1)).unwrap();
    attack(SocketAddr::from(([127, 0, 0, 1], cluster.listen_addr().unwrap().port())));
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (1, 2)).unwrap(), 3, "the worker that was there serves on");
    still_serves(&cluster);
    assert!(cluster.refusal_count() >= crafted().len() as u64, "every crafted hello was refused: {}", cluster.refusal_count());
    assert!(cluster.refusals().len() <= 100, "refusals are kept in bounded memory");
    assert!(cluster.refusals().iter().any(|r| r.contains("wrong secret")), "{:?}", cluster.refusals());
}

#[test]
fn crafted_hellos_on_a_worker_peer_listener_leave_it_serving() {
    let cluster = Cluster::builder().topology(Topology::AllToAll).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    // workers say where they listen right after they connect
    let registered = || pids.iter().all(|p| clusterman::__private::peer_listener(&cluster, *p).is_some());
    assert!(common::wait_until(Duration::from_secs(10), registered), "workers listen for peers");
    let listener = clusterman::__private::peer_listener(&cluster, pids[0]).unwrap();
    attack(listener.parse().unwrap());
    let before = cluster.routed_frames();
    assert_eq!(cluster.remote_call_fetch(pids[1], add_via, (pids[0], 20, 22)).unwrap(), 42, "worker-to-worker calls still work");
    assert_eq!(cluster.routed_frames(), before, "over the direct link, which the attack did not break");
    assert_eq!(cluster.workers(), pids);
    still_serves(&cluster);
}

#[test]
fn crafted_hellos_while_workers_may_join_leave_the_master_serving() {
    let cluster = Cluster::new().unwrap();
    let elastic = ElasticManager::start(&cluster, ElasticAddress::Ip("127.0.0.1".parse().unwrap()), 0).unwrap();
    attack(elastic.address());
    let mut worker = std::process::Command::new("bash").args(["-c", &elastic.connect_command()]).stdout(std::process::Stdio::null()).spawn().unwrap();
    let pids = elastic.wait_for(1, Duration::from_secs(30)).expect("a real worker still joins");
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (5, 5)).unwrap(), 10);
    still_serves(&cluster);
    cluster.shutdown().unwrap();
    let _ = worker.wait();
}

#[test]
fn a_hello_sent_a_byte_at_a_time_is_cut_at_the_handshake_deadline() {
    let cluster = Cluster::builder().handshakes(16, Duration::from_millis(800)).build().unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", cluster.listen_addr().unwrap().port())).unwrap();
    let started = Instant::now();
    // one byte every 100 ms: every read is quick, the whole hello never completes
    let trickle = std::thread::spawn(move || {
        for byte in hello_claiming(8).iter().cycle().take(300) {
            if s.write_all(&[*byte]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    assert!(common::wait_until(Duration::from_secs(5), || cluster.refusals().iter().any(|r| r.contains("no complete hello"))), "{:?}", cluster.refusals());
    let cut = started.elapsed();
    assert!(cut < Duration::from_secs(3), "cut after {cut:?}, deadline 800 ms");
    assert!(trickle.join().unwrap(), "the master closed the connection");
    still_serves(&cluster);
}

#[test]
fn a_reply_that_claims_2_to_the_60_bytes_is_an_error_not_an_abort() {
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(LocalManager::new(2)).unwrap();
    let err = cluster.remote_call_fetch(pids[0], lie_about_lengths, ()).unwrap_err();
    assert!(matches!(&err, Error::Codec(m) if m.contains("exceeds")), "{err}");
    assert_eq!(cluster.remote_call_fetch(pids[1], add, (1, 1)).unwrap(), 2);
    assert_eq!(cluster.remote_call_fetch(pids[0], add, (1, 1)).unwrap(), 2, "the liar itself serves on");
}

#[test]
fn a_burst_of_workers_larger_than_the_handshake_cap_all_get_in() {
    // 48 workers dial at once into room for 4 handshakes: the oldest are dropped, dial again
    let cluster = Cluster::builder().handshakes(4, Duration::from_secs(10)).build().unwrap();
    let pids = cluster.add_procs(LocalManager::new(48)).unwrap();
    assert_eq!(pids.len(), 48);
    let sums: Vec<i64> = cluster.pmap(add, (0..96i64).map(|i| (i, 1))).unwrap();
    assert_eq!(sums, (1..97).collect::<Vec<i64>>());
    cluster.shutdown().unwrap();
}
