//! The ranks of a run meet before training: rank 0 makes NCCL's unique id (128 bytes) and
//! hands it to the others over TCP, and the connections stay open as a control channel that
//! notices a rank that is gone and lets the ranks meet again (a barrier).
//!
//! Protocol (version 1, integers little-endian):
//! - a rank connects to rank 0 and sends its hello: `RCXR`, version u32, rank u32, world size
//!   u32;
//! - rank 0 answers at once with its greeting, `RCX0` and its version u32 (a connection that
//!   gets no greeting reached something else, and the rank tries again);
//! - once every rank has arrived, rank 0 sends each one byte 0 and the 128-byte id; if the
//!   run cannot start (world sizes differ, a rank twice, a rank missing at the timeout) it
//!   sends instead byte 1, the exit code u8, a length u32 and one line saying why, and every
//!   rank fails with that line;
//! - then control messages of 9 bytes (a tag, a u64): a rank's arrival at barrier n (tag 1),
//!   rank 0's release of barrier n (tag 2), and rank 0's news that rank r is lost (tag 3).
//!   Once the run's last barrier is released (`Control::finish`) a closed connection is no
//!   loss.
//!
//! `Init::File(PATH)`: rank 0 listens on a free port of every interface and writes its host
//! name and that port to PATH (a temporary file renamed over it), and removes PATH once
//! everyone has arrived or the wait failed; the others read PATH and connect. A file left by
//! an earlier run names a port where nobody answers rcx's greeting: the others keep reading
//! PATH until rank 0 of this run replaces it, within the timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Rank;
use super::launch::{Init, WorldEnv};
use crate::error::{Error, Result};

/// NCCL's unique id: what rank 0 hands to every rank.
pub type UniqueId = [u8; 128];

const HELLO_MAGIC: &[u8; 4] = b"RCXR";
const GREETING_MAGIC: &[u8; 4] = b"RCX0";
const PROTOCOL_VERSION: u32 = 1;
const FILE_MAGIC: &str = "rcx-rendezvous";

const ANSWER_ID: u8 = 0;
const ANSWER_REFUSED: u8 = 1;
const TAG_ARRIVE: u8 = 1;
const TAG_RELEASE: u8 = 2;
const TAG_LOST: u8 = 3;

/// How long a connection may take to show it is rcx (hello, greeting).
const HANDSHAKE: Duration = Duration::from_secs(5);
/// Between two tries to reach rank 0.
const RETRY: Duration = Duration::from_millis(100);
/// The longest refusal line read.
const MAX_REASON: usize = 4096;

/// Meets the other ranks: rank 0 calls `make_id` and hands its id to every rank. Every wait
/// ends within `timeout` (for a rank other than 0: `timeout` to reach rank 0, then as long
/// again for rank 0's answer) with one line naming the ranks or the address missing.
pub fn join(
    env: &WorldEnv,
    make_id: impl FnOnce() -> Result<UniqueId>,
    timeout: Duration,
) -> Result<(UniqueId, Control)> {
    let deadline = Instant::now() + timeout;
    if env.rank.rank == 0 {
        serve(env, make_id, deadline, timeout)
    } else {
        connect(env, deadline, timeout)
    }
}

// ---------------------------------------------------------------- rank 0

fn serve(
    env: &WorldEnv,
    make_id: impl FnOnce() -> Result<UniqueId>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(UniqueId, Control)> {
    let world_size = env.rank.world_size;
    let listener = listen(&env.init)?;
    let announced = match &env.init {
        Init::File(path) => Some(Announcement::write(path, &listener, world_size)?),
        Init::Tcp { .. } => None,
    };
    let id = make_id()?;
    let arrivals = accept_ranks(&listener, world_size, deadline, timeout, &env.init);
    // Once everyone is here (or the wait failed) nobody should read the file again.
    drop(announced);
    let mut peers = arrivals?;
    for peer in &mut peers {
        let mut answer = vec![ANSWER_ID];
        answer.extend_from_slice(&id);
        // On failure the connections close as this returns, which ends every other rank.
        peer.stream.write_all(&answer).map_err(|e| {
            Error::internal(format!(
                "rank 0 could not send the id to rank {} ({}): {e}",
                peer.rank, peer.addr
            ))
        })?;
    }
    Ok((id, Control::rank0(world_size, peers)?))
}

fn listen(init: &Init) -> Result<TcpListener> {
    match init {
        Init::Tcp { addr, port } => {
            let name =
                format!("rank 0's address {addr}:{port} (MASTER_ADDR, MASTER_PORT or --init)");
            let local = resolve(addr, *port)
                .map_err(|e| Error::user(format!("{name}: cannot resolve {addr}: {e}")))?;
            // Binding to MASTER_ADDR's own address checks that rank 0 runs on that machine.
            // (std sets SO_REUSEADDR, so a port left in TIME_WAIT by an earlier run binds.)
            let mut last = None;
            for socket in local {
                match TcpListener::bind(socket) {
                    Ok(listener) => return Ok(listener),
                    Err(e) => last = Some((socket, e)),
                }
            }
            let (socket, e) = last.expect("resolve returns at least one address");
            let why = match e.kind() {
                ErrorKind::AddrInUse => "the port is in use (another run?): choose another",
                ErrorKind::AddrNotAvailable => {
                    "not an address of this machine: rank 0 must run on MASTER_ADDR"
                }
                _ => "rank 0 cannot listen there",
            };
            Err(Error::user(format!(
                "{name}: cannot listen on {socket}: {e}: {why}"
            )))
        }
        Init::File(_) => TcpListener::bind("0.0.0.0:0")
            .map_err(|e| Error::internal(format!("rank 0 cannot listen on a free port: {e}"))),
    }
}

/// A connected rank, after its hello.
struct Peer {
    rank: usize,
    addr: SocketAddr,
    stream: TcpStream,
}

/// Accepts the world's other ranks until each has said hello once; any reason the run cannot
/// start is sent to every rank connected so far.
fn accept_ranks(
    listener: &TcpListener,
    world_size: usize,
    deadline: Instant,
    timeout: Duration,
    init: &Init,
) -> Result<Vec<Peer>> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::internal(format!("rank 0 cannot poll its listener: {e}")))?;
    let mut peers: Vec<Peer> = Vec::new();
    while peers.len() + 1 < world_size {
        if Instant::now() >= deadline {
            let missing: Vec<String> = (1..world_size)
                .filter(|r| !peers.iter().any(|p| p.rank == *r))
                .map(|r| r.to_string())
                .collect();
            let message = format!(
                "rank 0 waited {} s at {} and these ranks never arrived: {} (of world size \
                 {world_size})",
                timeout.as_secs_f64(),
                where_rank0_listens(init, listener),
                missing.join(", ")
            );
            refuse_all(&mut peers, 1, &message);
            return Err(Error::internal(message));
        }
        let (stream, addr) = match listener.accept() {
            Ok(connection) => connection,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // A connection that was reset before being accepted, and the like.
            Err(_) => continue,
        };
        let Some((mut stream, hello)) = read_hello(stream) else {
            eprintln!("rcx: rank 0 ignored a connection from {addr} that did not speak rcx");
            continue;
        };
        let refusal = if hello.version != PROTOCOL_VERSION {
            Some(format!(
                "rank {} ({addr}) speaks rendezvous protocol {}, rank 0 speaks {}: run the same \
                 rcx on every machine",
                hello.rank, hello.version, PROTOCOL_VERSION
            ))
        } else if hello.world_size != world_size {
            Some(format!(
                "rank {} ({addr}) has world size {}, rank 0 has {world_size}: every process \
                 must be started with the same WORLD_SIZE",
                hello.rank, hello.world_size
            ))
        } else if hello.rank == 0 {
            Some(format!(
                "a second process ({addr}) claims rank 0: each rank must be started once"
            ))
        } else {
            peers.iter().find(|p| p.rank == hello.rank).map(|first| {
                format!(
                    "rank {} arrived twice ({} and {addr}): each rank must be started once",
                    hello.rank, first.addr
                )
            })
        };
        if let Some(message) = refusal {
            let _ = stream.write_all(&refusal_bytes(2, &message));
            refuse_all(&mut peers, 2, &message);
            return Err(Error::user(message));
        }
        peers.push(Peer {
            rank: hello.rank,
            addr,
            stream,
        });
    }
    Ok(peers)
}

fn where_rank0_listens(init: &Init, listener: &TcpListener) -> String {
    match (init, listener.local_addr()) {
        (Init::Tcp { addr, port }, _) => format!("{addr}:{port}"),
        (Init::File(path), Ok(local)) => {
            format!("port {} (announced in {})", local.port(), path.display())
        }
        (Init::File(path), Err(_)) => format!("the address announced in {}", path.display()),
    }
}

struct Hello {
    version: u32,
    rank: usize,
    world_size: usize,
}

/// Reads a hello and answers rcx's greeting; None for a connection that is not an rcx rank.
fn read_hello(stream: TcpStream) -> Option<(TcpStream, Hello)> {
    let mut stream = stream;
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(HANDSHAKE)).ok()?;
    stream.set_nodelay(true).ok()?;
    let mut bytes = [0u8; 16]; // magic, version, rank, world size
    stream.read_exact(&mut bytes).ok()?;
    if &bytes[0..4] != HELLO_MAGIC {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let hello = Hello {
        version: word(4),
        rank: word(8) as usize,
        world_size: word(12) as usize,
    };
    let mut greeting = GREETING_MAGIC.to_vec();
    greeting.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    stream.write_all(&greeting).ok()?;
    stream.set_read_timeout(None).ok()?;
    Some((stream, hello))
}

fn refusal_bytes(code: u8, message: &str) -> Vec<u8> {
    let text = &message.as_bytes()[..message.len().min(MAX_REASON)];
    let mut bytes = vec![ANSWER_REFUSED, code];
    bytes.extend_from_slice(&(text.len() as u32).to_le_bytes());
    bytes.extend_from_slice(text);
    bytes
}

fn refuse_all(peers: &mut [Peer], code: u8, message: &str) {
    for peer in peers {
        let _ = peer.stream.write_all(&refusal_bytes(code, message));
    }
}

/// Rank 0's address in the file of `--init file:PATH`, removed when dropped.
struct Announcement<'a> {
    path: &'a Path,
}

impl<'a> Announcement<'a> {
    fn write(path: &'a Path, listener: &TcpListener, world_size: usize) -> Result<Self> {
        let port = listener
            .local_addr()
            .map_err(|e| Error::internal(format!("rank 0 cannot read its own port: {e}")))?
            .port();
        let text = format!(
            "{FILE_MAGIC} {PROTOCOL_VERSION}\nhost {}\nport {port}\nworld_size {world_size}\n",
            host_name()?
        );
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(format!(".tmp{}", std::process::id()));
        let temporary = std::path::PathBuf::from(temporary);
        std::fs::write(&temporary, text).map_err(|e| Error::io(&temporary, e))?;
        std::fs::rename(&temporary, path).map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            Error::io(path, e)
        })?;
        Ok(Announcement { path })
    }
}

impl Drop for Announcement<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path);
    }
}

fn host_name() -> Result<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into the buffer.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if status == 0 && !name.is_empty() => Ok(name.to_string()),
        _ => Err(Error::internal(
            "rank 0 cannot read this machine's host name",
        )),
    }
}

// ---------------------------------------------------------------- the other ranks

fn connect(env: &WorldEnv, deadline: Instant, timeout: Duration) -> Result<(UniqueId, Control)> {
    let Rank {
        rank, world_size, ..
    } = env.rank;
    let (mut stream, rank0) = loop {
        let last_problem = match try_reach_rank0(&env.init, rank, world_size) {
            Ok(reached) => break reached,
            Err(problem) => problem,
        };
        if Instant::now() >= deadline {
            let target = match &env.init {
                Init::Tcp { addr, port } => {
                    format!("at {addr}:{port} (MASTER_ADDR, MASTER_PORT or --init)")
                }
                Init::File(path) => format!("through {}", path.display()),
            };
            return Err(Error::internal(format!(
                "rank {rank} could not reach rank 0 {target} within {} s (last try: \
                 {last_problem}): is rank 0 running there?",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(RETRY);
    };
    // Rank 0 is up, so it answers within its own timeout, which ends before ours.
    let answer_by = timeout + HANDSHAKE;
    stream
        .set_read_timeout(Some(answer_by))
        .map_err(|e| Error::internal(format!("rank {rank}: cannot set a socket timeout: {e}")))?;
    let lost = |e: std::io::Error| {
        let what = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            format!(
                "no answer from rank 0 ({rank0}) within {} s",
                answer_by.as_secs_f64()
            )
        } else {
            format!("rank 0 ({rank0}) closed the connection before answering ({e}): see its output")
        };
        Error::internal(format!("rank {rank}: {what}"))
    };
    let mut kind = [0u8; 1];
    stream.read_exact(&mut kind).map_err(lost)?;
    match kind[0] {
        ANSWER_ID => {
            let mut id = [0u8; 128];
            stream.read_exact(&mut id).map_err(lost)?;
            stream.set_read_timeout(None).map_err(|e| {
                Error::internal(format!("rank {rank}: cannot clear a socket timeout: {e}"))
            })?;
            Ok((id, Control::rank_n(rank, world_size, stream, rank0)?))
        }
        ANSWER_REFUSED => {
            let mut head = [0u8; 5]; // exit code, length
            stream.read_exact(&mut head).map_err(lost)?;
            let length = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
            let mut text = vec![0u8; length.min(MAX_REASON)];
            stream.read_exact(&mut text).map_err(lost)?;
            let message = format!(
                "rank {rank}: refused by rank 0: {}",
                String::from_utf8_lossy(&text)
            );
            Err(if head[0] == 2 {
                Error::user(message)
            } else {
                Error::internal(message)
            })
        }
        other => Err(Error::internal(format!(
            "rank {rank}: rank 0 ({rank0}) sent an unknown answer {other}"
        ))),
    }
}

/// One try: find rank 0's address, connect, say hello and get rcx's greeting.
fn try_reach_rank0(
    init: &Init,
    rank: usize,
    world_size: usize,
) -> std::result::Result<(TcpStream, SocketAddr), String> {
    let addresses = match init {
        Init::Tcp { addr, port } => resolve(addr, *port).map_err(|e| format!("{addr}: {e}"))?,
        Init::File(path) => read_announcement(path, world_size)?,
    };
    let mut last = String::new();
    for socket in addresses {
        match greet(socket, rank, world_size) {
            Ok(stream) => return Ok((stream, socket)),
            Err(problem) => last = format!("{socket}: {problem}"),
        }
    }
    Err(last)
}

fn greet(
    socket: SocketAddr,
    rank: usize,
    world_size: usize,
) -> std::result::Result<TcpStream, String> {
    let mut stream = TcpStream::connect_timeout(&socket, HANDSHAKE).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HANDSHAKE))
        .map_err(|e| e.to_string())?;
    let mut hello = HELLO_MAGIC.to_vec();
    for word in [PROTOCOL_VERSION, rank as u32, world_size as u32] {
        hello.extend_from_slice(&word.to_le_bytes());
    }
    stream.write_all(&hello).map_err(|e| e.to_string())?;
    let mut greeting = [0u8; 8]; // magic, version
    stream
        .read_exact(&mut greeting)
        .map_err(|e| format!("connected, but no rcx greeting ({e})"))?;
    if &greeting[0..4] != GREETING_MAGIC {
        return Err("connected, but what answered is not rcx's rank 0".to_string());
    }
    // A rank 0 of another protocol version goes on to refuse this rank with the reason.
    Ok(stream)
}

/// Rank 0's addresses from `--init file:PATH`; a missing, partly written or malformed file is
/// one more reason to try again.
fn read_announcement(
    path: &Path,
    world_size: usize,
) -> std::result::Result<Vec<SocketAddr>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let field = |line: Option<&str>, key: &str| -> Option<String> {
        line?
            .strip_prefix(key)?
            .strip_prefix(' ')
            .map(str::to_string)
    };
    let header = format!("{FILE_MAGIC} {PROTOCOL_VERSION}");
    let parsed = (|| {
        if lines.next()? != header {
            return None;
        }
        let host = field(lines.next(), "host")?;
        let port: u16 = field(lines.next(), "port")?.parse().ok()?;
        let world: usize = field(lines.next(), "world_size")?.parse().ok()?;
        Some((host, port, world))
    })();
    let Some((host, port, world)) = parsed else {
        return Err(format!(
            "{}: not an rcx rendezvous file of protocol {PROTOCOL_VERSION}",
            path.display()
        ));
    };
    if world != world_size {
        return Err(format!(
            "{} is for world size {world}, this rank's is {world_size}",
            path.display()
        ));
    }
    resolve(&host, port).map_err(|e| format!("{} names {host}: {e}", path.display()))
}

fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let addresses: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addresses.is_empty() {
        return Err(std::io::Error::new(ErrorKind::NotFound, "no address"));
    }
    Ok(addresses)
}

// ---------------------------------------------------------------- the control channel

/// The connections of the rendezvous, kept open for the run: rank 0 holds one per other
/// rank, the others one to rank 0. A thread per connection reads it; a connection closed
/// (or reset) before the run's last barrier means its rank is gone, and rank 0 tells the
/// others which.
pub struct Control {
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    next_barrier: AtomicU64,
}

struct Shared {
    rank: usize,
    world_size: usize,
    state: Mutex<State>,
    changed: Condvar,
    /// Where this rank writes: rank 0 to each other rank (rank, stream), the others to
    /// rank 0 (one entry, rank 0).
    writers: Mutex<Vec<(usize, TcpStream)>>,
}

#[derive(Default)]
struct State {
    /// The first rank found gone, in one line.
    lost: Option<String>,
    /// Rank 0: the latest barrier each rank has arrived at (index: rank).
    arrived: Vec<u64>,
    /// The others: the latest barrier rank 0 released.
    released: u64,
    /// The others: the run's last barrier, once this rank has arrived at it.
    last_barrier: Option<u64>,
    /// The last barrier was passed, or this side is closing: closed connections are expected.
    finished: bool,
}

impl Control {
    fn rank0(world_size: usize, peers: Vec<Peer>) -> Result<Control> {
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for peer in &peers {
            readers.push((
                peer.rank,
                peer.addr,
                peer.stream.try_clone().map_err(clone_failed)?,
            ));
        }
        for peer in peers {
            writers.push((peer.rank, peer.stream));
        }
        let shared = Shared::new(0, world_size, writers);
        let readers = readers
            .into_iter()
            .map(|(rank, addr, stream)| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || shared.rank0_reads(stream, rank, addr))
            })
            .collect();
        Ok(Control {
            shared,
            readers,
            next_barrier: AtomicU64::new(1),
        })
    }

    fn rank_n(
        rank: usize,
        world_size: usize,
        stream: TcpStream,
        rank0: SocketAddr,
    ) -> Result<Control> {
        let reader = stream.try_clone().map_err(clone_failed)?;
        let shared = Shared::new(rank, world_size, vec![(0, stream)]);
        let reading = Arc::clone(&shared);
        let readers = vec![std::thread::spawn(move || {
            reading.rank_n_reads(reader, rank0)
        })];
        Ok(Control {
            shared,
            readers,
            next_barrier: AtomicU64::new(1),
        })
    }

    /// One line naming the first rank found gone (for a rank other than 0: as rank 0 reported
    /// it, or rank 0 itself), if any.
    pub fn peer_lost(&self) -> Option<String> {
        self.shared.lock().lost.clone()
    }

    /// Waits until every rank has called `barrier` as many times as this one; fails when a
    /// rank is lost or `timeout` passes first, naming the ranks (rank 0) or rank 0 (others).
    pub fn barrier(&self, timeout: Duration) -> Result<()> {
        self.meet(timeout, false)
    }

    /// The run's last barrier: after it the ranks may exit, and their closed connections are
    /// no loss.
    pub fn finish(self, timeout: Duration) -> Result<()> {
        self.meet(timeout, true)
    }

    fn meet(&self, timeout: Duration, last: bool) -> Result<()> {
        let shared = &self.shared;
        let n = self.next_barrier.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        if shared.rank == 0 {
            let state = shared.lock();
            let state = shared.wait_until(state, deadline, |s| {
                s.lost.is_some() || s.arrived[1..].iter().all(|&a| a >= n)
            });
            if let Some(lost) = &state.lost {
                return Err(Error::internal(format!("barrier {n}: {lost}")));
            }
            let missing: Vec<String> = (1..shared.world_size)
                .filter(|&r| state.arrived[r] < n)
                .map(|r| r.to_string())
                .collect();
            if !missing.is_empty() {
                return Err(Error::internal(format!(
                    "barrier {n}: ranks {} did not arrive within {} s",
                    missing.join(", "),
                    timeout.as_secs_f64()
                )));
            }
            let mut state = state;
            if last {
                state.finished = true;
            }
            drop(state);
            shared.send_all(TAG_RELEASE, n, None);
            Ok(())
        } else {
            {
                let mut state = shared.lock();
                if last {
                    state.last_barrier = Some(n);
                }
            }
            shared.send_all(TAG_ARRIVE, n, None);
            let state = shared.lock();
            let state = shared.wait_until(state, deadline, |s| s.lost.is_some() || s.released >= n);
            if state.released >= n {
                return Ok(());
            }
            if let Some(lost) = &state.lost {
                return Err(Error::internal(format!(
                    "rank {}: barrier {n}: {lost}",
                    shared.rank
                )));
            }
            Err(Error::internal(format!(
                "rank {}: barrier {n}: rank 0 did not release it within {} s",
                shared.rank,
                timeout.as_secs_f64()
            )))
        }
    }
}

impl Drop for Control {
    /// Closes the connections. Before the run's last barrier that tells the other side this
    /// rank is gone; this side's readers, ending on the closed sockets, record nothing.
    fn drop(&mut self) {
        self.shared.lock().finished = true;
        let writers = self
            .shared
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (_, stream) in writers.iter() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        drop(writers);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

fn clone_failed(e: std::io::Error) -> Error {
    Error::internal(format!(
        "cannot share a control connection with its reader: {e}"
    ))
}

fn message(tag: u8, value: u64) -> [u8; 9] {
    let mut bytes = [0u8; 9];
    bytes[0] = tag;
    bytes[1..].copy_from_slice(&value.to_le_bytes());
    bytes
}

fn read_message(stream: &mut TcpStream) -> std::io::Result<(u8, u64)> {
    let mut bytes = [0u8; 9];
    stream.read_exact(&mut bytes)?;
    Ok((
        bytes[0],
        u64::from_le_bytes(bytes[1..].try_into().expect("8 bytes")),
    ))
}

impl Shared {
    fn new(rank: usize, world_size: usize, writers: Vec<(usize, TcpStream)>) -> Arc<Shared> {
        let state = State {
            arrived: vec![0; world_size],
            ..State::default()
        };
        Arc::new(Shared {
            rank,
            world_size,
            state: Mutex::new(state),
            changed: Condvar::new(),
            writers: Mutex::new(writers),
        })
    }

    /// Writes one control message on every connection this rank writes to, but `except`'s;
    /// a failed write is left to the readers, which see the connection closed.
    fn send_all(&self, tag: u8, value: u64, except: Option<usize>) {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        for (rank, stream) in writers.iter_mut() {
            if Some(*rank) != except {
                let _ = stream.write_all(&message(tag, value));
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
        done: impl Fn(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while !done(&state) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state
    }

    /// Records the first loss, unless the run is past its last barrier or closing.
    fn record_lost(&self, line: String) -> bool {
        let mut state = self.lock();
        if state.finished || state.lost.is_some() {
            return false;
        }
        state.lost = Some(line);
        self.changed.notify_all();
        true
    }

    fn rank0_reads(&self, mut stream: TcpStream, rank: usize, addr: SocketAddr) {
        let why = loop {
            match read_message(&mut stream) {
                Ok((TAG_ARRIVE, n)) => {
                    let mut state = self.lock();
                    state.arrived[rank] = n;
                    self.changed.notify_all();
                }
                Ok((tag, _)) => break format!("sent an unknown control message {tag}"),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    break "closed its control connection".to_string();
                }
                Err(e) => break format!("lost its control connection ({e})"),
            }
        };
        let line =
            format!("rank {rank} ({addr}) {why}: the process ended or its machine is unreachable");
        if self.record_lost(line) {
            self.send_all(TAG_LOST, rank as u64, Some(rank));
        }
    }

    fn rank_n_reads(&self, mut stream: TcpStream, rank0: SocketAddr) {
        let line = loop {
            match read_message(&mut stream) {
                Ok((TAG_RELEASE, n)) => {
                    let mut state = self.lock();
                    state.released = n;
                    if state.last_barrier == Some(n) {
                        state.finished = true;
                    }
                    self.changed.notify_all();
                }
                Ok((TAG_LOST, r)) => {
                    break format!("rank {r} is gone (rank 0 lost its control connection)");
                }
                Ok((tag, _)) => {
                    break format!("rank 0 ({rank0}) sent an unknown control message {tag}");
                }
                Err(e) => {
                    break format!(
                        "rank 0 ({rank0}) closed its control connection ({e}): the process \
                         ended or its machine is unreachable"
                    );
                }
            }
        };
        self.record_lost(line);
    }
}
