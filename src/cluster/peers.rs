//! Direct links between workers (the all-to-all topology). Each worker listens for its
//! peers; the first call to another worker asks the master where that worker listens, dials
//! it, proves the cluster secret and build, and keeps the link for later calls. Calls that
//! arrive on a direct link run on that link's own executor thread, so a link's reader never
//! waits on user code. If a peer cannot be dialled (a firewall between workers), calls to it
//! keep going through the master.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::Pid;
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::launch::listener::{Admit, Listener};
use crate::protocol::{self, Frame, Hello, Kind, MAX_HANDSHAKE, Refusal, Secret, Welcome};
use crate::sys;

use super::link::{Link, TcpOut};
use super::worker::read_prefixed;
use super::{Cluster, exec};

/// This worker's direct links and the listener its peers dial.
pub(crate) struct Peers {
    me: Pid,
    secret: Secret,
    links: Mutex<HashMap<Pid, Arc<Link>>>,
    /// Peers that could not be dialled: their calls go through the master.
    unreachable: Mutex<Vec<Pid>>,
    listener: Mutex<Option<Listener>>,
}

impl Peers {
    /// Starts listening on `ip` (the address this worker reaches the master from).
    pub(crate) fn start(me: Pid, secret: Secret, ip: IpAddr) -> Result<(Arc<Peers>, SocketAddr)> {
        let peers = Arc::new(Peers { me, secret, links: Mutex::default(), unreachable: Mutex::default(), listener: Mutex::new(None) });
        let listener = Listener::start(SocketAddr::new(ip, 0), secret, Arc::new(PeerAdmission(Arc::downgrade(&peers))))?;
        let addr = listener.addr();
        *peers.listener.lock().expect("peer listener lock") = Some(listener);
        Ok((peers, addr))
    }

    /// The direct link to `pid`, dialled on first use; `None`: go through the master.
    pub(crate) fn link(&self, cluster: &Cluster, pid: Pid) -> Option<Arc<Link>> {
        if let Some(link) = self.links.lock().expect("peer links lock").get(&pid).filter(|l| !l.is_dead()) {
            return Some(link.clone());
        }
        if self.unreachable.lock().expect("unreachable lock").contains(&pid) {
            return None;
        }
        match self.dial(cluster, pid) {
            Ok(link) => Some(self.links.lock().expect("peer links lock").entry(pid).or_insert(link).clone()),
            Err(e) => {
                tracing::debug!("worker {}: no direct link to worker {pid} ({e}); going through the master", self.me);
                self.unreachable.lock().expect("unreachable lock").push(pid);
                None
            }
        }
    }

    fn dial(&self, cluster: &Cluster, pid: Pid) -> Result<Arc<Link>> {
        let address = cluster.remote_call_fetch(1, super::builtin_peer_address, (pid,))?.ok_or(Error::NoSuchWorker(pid))?;
        let addr: SocketAddr = address.parse().map_err(|_| Error::Protocol(format!("bad peer address {address:?}")))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| Error::io(format!("dialling worker {pid} at {addr}"), e))?;
        stream.set_nodelay(true).map_err(|e| Error::io("setting TCP_NODELAY", e))?;
        let (fp, exe) = fingerprint::this_process();
        let hello = Hello {
            secret: self.secret,
            fingerprint: fp.clone(),
            exe: exe.clone(),
            launch: None,
            host: sys::hostname(),
            os_pid: std::process::id(),
            mpi: None,
            peer: Some(self.me),
        };
        stream.write_all(&hello.encode()).map_err(|e| Error::io("sending a peer hello", e))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| Error::io("setting a timeout", e))?;
        let body = read_prefixed(&mut stream, MAX_HANDSHAKE).map_err(|e| Error::io(format!("reading worker {pid}'s answer"), e))?;
        stream.set_read_timeout(None).map_err(|e| Error::io("clearing a timeout", e))?;
        match Welcome::decode(&body).map_err(Error::Handshake)? {
            Welcome::Accepted { pid: theirs, .. } if theirs == pid => serve_link(self.me, pid, stream),
            Welcome::Accepted { pid: theirs, .. } => Err(Error::Handshake(format!("dialled worker {pid}, but worker {theirs} answered"))),
            Welcome::Refused(reason) => Err(Error::Handshake(reason)),
        }
    }
}

/// Accepts direct links from other workers of this cluster.
struct PeerAdmission(std::sync::Weak<Peers>);

impl Admit for PeerAdmission {
    fn admit(&self, hello: &Hello) -> std::result::Result<Welcome, Refusal> {
        let peers = self.0.upgrade().ok_or(Refusal { reason: "this worker is stopping".into(), launch: None })?;
        match hello.peer {
            Some(_) => Ok(Welcome::Accepted { pid: peers.me, direct_links: true }),
            None => Err(Refusal { reason: "this is a worker's peer listener, not the master".into(), launch: None }),
        }
    }

    fn serve(&self, _me: Pid, hello: Hello, stream: TcpStream) {
        let (Some(peers), Some(from)) = (self.0.upgrade(), hello.peer) else { return };
        if let Ok(link) = serve_link(peers.me, from, stream) {
            peers.links.lock().expect("peer links lock").entry(from).or_insert(link);
        }
    }

    fn refused(&self, peer: SocketAddr, refusal: &Refusal) {
        tracing::warn!("refused a direct link from {peer}: {}", refusal.reason);
    }
}

/// Starts the reader and executor threads of a direct link to `peer`.
fn serve_link(me: Pid, peer: Pid, stream: TcpStream) -> Result<Arc<Link>> {
    let reader = stream.try_clone().map_err(|e| Error::io("cloning a peer connection", e))?;
    let link = Link::new(peer, TcpOut::boxed(stream));
    let (calls, incoming) = mpsc::channel::<Frame>();
    let spawn = |name: String, f: Box<dyn FnOnce() + Send>| std::thread::Builder::new().name(name).spawn(f).map_err(|e| Error::io("starting a peer thread", e));
    let executor = link.clone();
    spawn(format!("cman-peer-exec-{peer}"), Box::new(move || {
        for frame in incoming {
            if let Some(reply) = exec::execute(me, &frame) {
                let _ = executor.send(reply);
            }
        }
    }))?;
    let reading = link.clone();
    spawn(format!("cman-peer-{peer}"), Box::new(move || {
        let mut reader = BufReader::with_capacity(64 * 1024, reader);
        let reason = loop {
            match protocol::read_frame(&mut reader, protocol::DEFAULT_MAX_FRAME) {
                Ok(Some(frame)) if frame.header.src != peer => break format!("worker {peer} sent a frame claiming to be from pid {}", frame.header.src),
                Ok(Some(frame)) => match frame.header.kind {
                    Kind::Reply | Kind::Failure => reading.resolve(frame),
                    Kind::Call | Kind::Cast | Kind::Batch => {
                        let _ = calls.send(frame);
                    }
                    other => break format!("unexpected {other:?} frame on a direct link"),
                },
                Ok(None) => break "the direct link closed".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        reading.close();
        reading.fail_all(&reason);
    }))?;
    Ok(link)
}
