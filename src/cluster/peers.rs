//! Direct links between workers (the all-to-all topology). Each worker listens for its
//! peers; the first call to another worker asks the master where that worker listens, dials
//! it, proves the cluster secret and build, and keeps the link for later calls. Each link has
//! a reader thread that resolves replies and hands calls to the worker's serving thread, so
//! every call a worker runs, from any link, runs there, and nested calls cannot deadlock.
//! If a peer cannot be dialled (a firewall between workers), calls to it keep going through
//! the master.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::ids::Pid;
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::protocol::{Health, Hello, Kind, Refusal, Secret, Terms, Welcome, bare};
use crate::sys;
use crate::transport::listener::{Admit, HandshakeLimits, Listener};
use crate::transport::tcp::{FrameStream, TcpOut, dial};

use super::Cluster;
use super::link::{Link, Received, SharedCore};
use super::worker::Delivery;

/// This worker's direct links and the listener its peers dial.
pub(crate) struct Peers {
    secret: Secret,
    terms: Terms,
    core: SharedCore,
    links: Mutex<HashMap<Pid, Arc<Link>>>,
    /// Peers that could not be dialled: their calls go through the master.
    unreachable: Mutex<Vec<Pid>>,
    listener: Mutex<Option<Listener>>,
    /// The serving thread's inbox: calls from every link go there.
    to_serving: Sender<Delivery>,
}

impl Peers {
    /// Starts listening on `ip` (the address this worker reaches the master from).
    pub(crate) fn start(core: &SharedCore, secret: Secret, ip: IpAddr, to_serving: Sender<Delivery>) -> Result<(Arc<Peers>, SocketAddr)> {
        let terms = core.lock().expect("core lock").terms();
        let peers = Arc::new(Peers { secret, terms, core: core.clone(), links: Mutex::default(), unreachable: Mutex::default(), listener: Mutex::new(None), to_serving });
        let listener = Listener::start(SocketAddr::new(ip, 0), secret, Arc::new(PeerAdmission(Arc::downgrade(&peers))), HandshakeLimits::default())?;
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
            Ok(Some(link)) => Some(self.links.lock().expect("peer links lock").entry(pid).or_insert(link).clone()),
            Ok(None) => None, // it has not said where it listens yet: this call goes through the master
            Err(e) => {
                tracing::debug!("worker {}: no direct link to worker {pid} ({e}); going through the master", self.terms.pid);
                self.unreachable.lock().expect("unreachable lock").push(pid);
                None
            }
        }
    }

    /// Dials worker `pid`; `Ok(None)` if it has not registered its address yet.
    fn dial(&self, cluster: &Cluster, pid: Pid) -> Result<Option<Arc<Link>>> {
        let Some(address) = cluster.remote_call_fetch(1, super::builtin_peer_address, (pid,))? else { return Ok(None) };
        let (fp, exe) = fingerprint::this_process();
        let hello = Hello {
            secret: self.secret,
            fingerprint: fp.clone(),
            exe: exe.clone(),
            launch: None,
            host: sys::hostname(),
            os_pid: std::process::id(),
            mpi: None,
            peer: Some(self.terms.pid),
            problem: None,
        };
        let (stream, welcome) = dial(&address, &hello, Instant::now() + Duration::from_secs(5)).map_err(|e| Error::io(format!("dialling worker {pid} at {address}"), e))?;
        match welcome {
            Welcome::Accepted(theirs) if theirs.pid == pid => self.serve_link(pid, stream).map(Some),
            Welcome::Accepted(theirs) => Err(Error::Handshake(format!("dialled worker {pid}, but worker {} answered", theirs.pid))),
            Welcome::Refused(reason) => Err(Error::Handshake(reason)),
        }
    }

    /// Starts the reader thread of a direct link to `peer`.
    fn serve_link(&self, peer: Pid, stream: TcpStream) -> Result<Arc<Link>> {
        let reader = stream.try_clone().map_err(|e| Error::io("cloning a peer connection", e))?;
        let link = Link::new(&self.core, peer, TcpOut::over(stream));
        let (reading, to_serving, max_frame) = (link.clone(), self.to_serving.clone(), self.terms.max_frame);
        let spawned = std::thread::Builder::new().name(format!("cman-peer-{peer}")).spawn(move || {
            let mut reader = FrameStream::new(reader, max_frame);
            let reason = loop {
                let received = match reader.next() {
                    Ok(Some(frame)) => reading.receive(frame),
                    Ok(None) => break "the direct link closed".to_string(),
                    Err(e) => break e.to_string(),
                };
                match received {
                    Ok(Received::Nothing) => {}
                    Ok(received) => {
                        let _ = to_serving.send(Delivery::Received(received, reading.clone()));
                    }
                    Err(e) => break e,
                }
            };
            reading.close();
            reading.closed(&reason);
        });
        spawned.map_err(|e| Error::io("starting a peer thread", e))?;
        Ok(link)
    }

    /// Sends a heartbeat on every direct link and gives up on peers silent for too long.
    pub(crate) fn heartbeat(&self, me: Pid) {
        let links: Vec<Arc<Link>> = self.links.lock().expect("peer links lock").values().filter(|l| !l.is_dead()).cloned().collect();
        for link in links {
            let _ = link.send(bare(Kind::Heartbeat, me, link.peer));
            match link.health() {
                Health::Alive => {}
                Health::Silent(silence) => link.give_up(format!("no heartbeat from worker {} for {} s", link.peer, silence.as_secs())),
                Health::Closed => link.give_up(format!("worker {} closed the direct link", link.peer)),
            }
        }
    }
}

/// Accepts direct links from other workers of this cluster.
struct PeerAdmission(std::sync::Weak<Peers>);

impl Admit for PeerAdmission {
    /// The pid of the worker dialling.
    type Seat = Pid;

    fn admit(&self, hello: &Hello) -> std::result::Result<(Welcome, Pid), Refusal> {
        let peers = self.0.upgrade().ok_or(Refusal::anonymous("this worker is stopping"))?;
        match hello.peer {
            Some(from) => Ok((Welcome::Accepted(peers.terms), from)),
            None => Err(Refusal::anonymous("this is a worker's peer listener, not the master")),
        }
    }

    fn serve(&self, from: Pid, _hello: Hello, stream: tokio::net::TcpStream) {
        let Some(peers) = self.0.upgrade() else { return };
        // a direct link has a reader thread of its own (it blocks)
        let Ok(stream) = stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) else { return };
        if let Ok(link) = peers.serve_link(from, stream) {
            peers.links.lock().expect("peer links lock").entry(from).or_insert(link);
        }
    }

    fn refused(&self, peer: SocketAddr, refusal: &Refusal) {
        tracing::warn!("refused a direct link from {peer}: {}", refusal.reason);
    }
}
