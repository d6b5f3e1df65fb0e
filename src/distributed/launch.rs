//! Starting the ranks of a run. On one machine `rcx train CONFIG --nproc N` is the parent of
//! N ranks (`run_local`, over a `Supervisor`); on several machines a launcher (torchrun, Slurm's
//! `srun`, a hand-written script) starts one process per GPU and each reads where it stands
//! from the variables that launcher sets (`world_from_env`).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Rank;
use crate::error::{Error, Result};
use crate::signals::Interrupts;

/// How the ranks find rank 0 (`rendezvous::join`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Init {
    /// Rank 0 listens at this address (MASTER_ADDR, or `--init tcp://HOST:PORT`).
    Tcp { addr: String, port: u16 },
    /// Rank 0 announces where it listens in this file on a shared file system
    /// (`--init file:PATH`).
    File(PathBuf),
}

/// A process of a run over several processes: its rank, and how it meets the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldEnv {
    pub rank: Rank,
    pub init: Init,
}

/// This process's place in a run, from the launcher's variables and `--init`'s value (None
/// without the flag). `Ok(None)`: no launcher variables are set, or they describe a world of
/// one process: a single process, nothing to meet.
pub fn world_from_env(init_flag: Option<&str>) -> Result<Option<WorldEnv>> {
    world_from_vars(&|name| std::env::var(name).ok(), init_flag)
}

/// `world_from_env` over any source of variables (the tests pass a map).
///
/// torchrun's RANK, WORLD_SIZE and LOCAL_RANK come first; without any of them, Slurm's
/// SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID. A set is all or nothing. The address of rank
/// 0 is `--init` when given (which overrides MASTER_ADDR and MASTER_PORT), else MASTER_ADDR and
/// MASTER_PORT, which Slurm does not set: a Slurm script exports them or passes `--init`.
/// Under a torchrun whose agent serves its own store on MASTER_PORT
/// (TORCHELASTIC_USE_AGENT_STORE=True), rank 0 listens on MASTER_PORT + 1.
pub fn world_from_vars(
    vars: &dyn Fn(&str) -> Option<String>,
    init_flag: Option<&str>,
) -> Result<Option<WorldEnv>> {
    const TORCHRUN: [&str; 3] = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];
    const SLURM: [&str; 3] = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"];
    let names = if TORCHRUN.iter().any(|n| vars(n).is_some()) {
        TORCHRUN
    } else if SLURM.iter().any(|n| vars(n).is_some()) {
        SLURM
    } else {
        return match init_flag {
            None => Ok(None),
            Some(flag) => Err(Error::user(format!(
                "--init {flag}: no launcher variables are set (RANK, WORLD_SIZE and LOCAL_RANK, \
                 or SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID): expected --init only in a \
                 process started by a launcher, or with --nproc"
            ))),
        };
    };
    let [rank_name, world_name, local_name] = names;
    let number = |name: &str| -> Result<usize> {
        let value = vars(name).ok_or_else(|| {
            let set: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| vars(n).is_some())
                .collect();
            let verb = if set.len() == 1 { "is" } else { "are" };
            Error::user(format!(
                "{name} is not set, but {} {verb}: expected all of {}",
                set.join(" and "),
                names.join(", ")
            ))
        })?;
        value.parse::<usize>().map_err(|_| {
            Error::user(format!(
                "{name}={value:?}: expected a non-negative whole number"
            ))
        })
    };
    let world_size = number(world_name)?;
    let rank = number(rank_name)?;
    let local_rank = number(local_name)?;
    if world_size == 0 {
        return Err(Error::user(format!(
            "{world_name}=0: expected at least 1 process"
        )));
    }
    if rank >= world_size {
        return Err(Error::user(format!(
            "{rank_name}={rank}: expected a rank below {world_name}={world_size}"
        )));
    }
    if local_rank >= world_size {
        return Err(Error::user(format!(
            "{local_name}={local_rank}: expected a local rank below {world_name}={world_size}"
        )));
    }
    if world_size == 1 {
        return Ok(None);
    }
    let init = match init_flag {
        Some(flag) => parse_init(flag)?,
        None => master_from_vars(vars)?,
    };
    let rank = Rank {
        rank,
        world_size,
        local_rank,
    };
    Ok(Some(WorldEnv { rank, init }))
}

/// `--init tcp://HOST:PORT` or `--init file:PATH`.
pub fn parse_init(flag: &str) -> Result<Init> {
    if let Some(path) = flag.strip_prefix("file:") {
        if path.is_empty() {
            return Err(Error::user("--init file:: expected a path after file:"));
        }
        return Ok(Init::File(PathBuf::from(path)));
    }
    let expected = "expected tcp://HOST:PORT or file:PATH";
    let Some(address) = flag.strip_prefix("tcp://") else {
        return Err(Error::user(format!("--init {flag}: {expected}")));
    };
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(Error::user(format!("--init {flag}: no port: {expected}")));
    };
    // An IPv6 address is written in brackets, as in a URL: tcp://[::1]:29500.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(Error::user(format!("--init {flag}: no host: {expected}")));
    }
    let port = parse_port(port).map_err(|why| Error::user(format!("--init {flag}: {why}")))?;
    Ok(Init::Tcp {
        addr: host.to_string(),
        port,
    })
}

fn master_from_vars(vars: &dyn Fn(&str) -> Option<String>) -> Result<Init> {
    let missing = |name: &str| {
        Error::user(format!(
            "{name} is not set: expected MASTER_ADDR and MASTER_PORT (rank 0's host and a free \
             port), or --init tcp://HOST:PORT or --init file:PATH"
        ))
    };
    let addr = vars("MASTER_ADDR").ok_or_else(|| missing("MASTER_ADDR"))?;
    let port = vars("MASTER_PORT").ok_or_else(|| missing("MASTER_PORT"))?;
    if addr.trim().is_empty() {
        return Err(Error::user(
            "MASTER_ADDR is empty: expected rank 0's host name or address",
        ));
    }
    let port =
        parse_port(&port).map_err(|why| Error::user(format!("MASTER_PORT={port:?}: {why}")))?;
    // Recent torchrun's agent on the first machine already serves its own store on
    // MASTER_PORT (and says so in this variable), so rank 0 takes the next port.
    if vars("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") {
        let next = port.checked_add(1).ok_or_else(|| {
            Error::user(format!(
                "MASTER_PORT={port}: under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) rank 0 \
                 listens on MASTER_PORT + 1: expected a port below 65535"
            ))
        })?;
        return Ok(Init::Tcp { addr, port: next });
    }
    Ok(Init::Tcp { addr, port })
}

fn parse_port(text: &str) -> std::result::Result<u16, &'static str> {
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err("expected a port number from 1 to 65535"),
    }
}

/// The parent of `rcx train CONFIG --nproc N`: starts N ranks on this machine (the current
/// executable with `args`, the train command line without `--nproc`), each with RANK,
/// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free
/// loopback port) set, and waits for them (`Supervisor::wait`). SIGINT and SIGTERM are passed
/// on to the ranks. `grace`: how long ranks told to stop (SIGTERM) after another failed have
/// before SIGKILL. Returns the exit code for the whole run, after printing the failure's line.
pub fn run_local(nproc: usize, args: &[OsString], grace: Duration) -> Result<i32> {
    if nproc == 0 {
        return Err(Error::user("--nproc 0: expected at least 1 process"));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot find rcx's own executable: {e}")))?;
    let port = free_loopback_port()?;
    let commands = (0..nproc)
        .map(|rank| {
            let mut command = Command::new(&exe);
            command
                .args(args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", nproc.to_string())
                .env("LOCAL_WORLD_SIZE", nproc.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                // The port above is rank 0's own, whatever a surrounding torchrun said.
                .env_remove("TORCHELASTIC_USE_AGENT_STORE");
            command
        })
        .collect();
    let interrupts = Interrupts::install();
    let supervisor = Supervisor::spawn(commands, grace)?;
    let finished = supervisor.wait(&|| interrupts.received().map(|(signal, _)| signal));
    if let Some(message) = &finished.message {
        eprintln!("rcx: {message}");
    }
    Ok(finished.code)
}

/// A loopback port nobody listens on now. Another program could take it before rank 0 binds
/// it; rank 0's bind then fails naming the port, and a second try picks another.
fn free_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::internal(format!("cannot find a free loopback port: {e}")))?;
    Ok(listener.port())
}

/// How a supervised group of processes ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// 0 when all exited 0; else the first failure's exit code (1 for a process killed by a
    /// signal other than one passed on to it, 128 + N for signal N passed on).
    pub code: i32,
    /// One line naming the first process that failed, and how.
    pub message: Option<String>,
}

/// Processes started together that live and die together: the ranks of `--nproc`, or any
/// commands (the tests use `sh` and `sleep`). Process i is called rank i.
///
/// - Each runs in its own process group, so that a terminal's Ctrl-C reaches the parent
///   alone, which passes it on once (a second copy would hit a rank's reset handler and kill
///   it mid-save); stopping a rank stops whatever it started.
/// - On Linux each gets SIGTERM when the parent dies (PR_SET_PDEATHSIG), so that killing
///   the parent leaves no rank running.
/// - Their output lines (ended by a newline or a carriage return) reach the parent's stdout
///   and stderr whole, each prefixed by `[rank i] `, so that ranks never cut into each
///   other's lines.
pub struct Supervisor {
    children: Vec<Child>,
    output: Vec<JoinHandle<()>>,
    grace: Duration,
}

const POLL: Duration = Duration::from_millis(20);

impl Supervisor {
    /// Starts every command. If one cannot start, those already started are killed.
    pub fn spawn(commands: Vec<Command>, grace: Duration) -> Result<Supervisor> {
        let mut supervisor = Supervisor {
            children: Vec::new(),
            output: Vec::new(),
            grace,
        };
        for (rank, mut command) in commands.into_iter().enumerate() {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            configure_child(&mut command);
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(e) => {
                    supervisor.signal_all(libc::SIGKILL);
                    supervisor.reap_all();
                    return Err(Error::internal(format!(
                        "cannot start rank {rank} ({}): {e}",
                        command.get_program().to_string_lossy()
                    )));
                }
            };
            let prefix = format!("[rank {rank}] ");
            if let Some(out) = child.stdout.take() {
                let prefix = prefix.clone();
                supervisor.output.push(std::thread::spawn(move || {
                    copy_lines(out, &prefix, &mut std::io::stdout())
                }));
            }
            if let Some(err) = child.stderr.take() {
                supervisor.output.push(std::thread::spawn(move || {
                    copy_lines(err, &prefix, &mut std::io::stderr())
                }));
            }
            supervisor.children.push(child);
        }
        Ok(supervisor)
    }

    /// The process ids (each also its process group's id).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Waits until every process has ended. `pending_signal` is asked between polls for a
    /// signal the parent received (SIGINT, SIGTERM); each new one is passed on to the
    /// processes still running, which are then left to stop in their own time. Otherwise,
    /// when one exits non-zero or is killed, the others get SIGTERM, then SIGKILL after the
    /// grace period.
    pub fn wait(mut self, pending_signal: &dyn Fn() -> Option<i32>) -> Finished {
        let mut status: Vec<Option<ExitStatus>> = vec![None; self.children.len()];
        let mut first_failure: Option<(usize, ExitStatus)> = None;
        let mut passed_on: Vec<i32> = Vec::new();
        let mut kill_at: Option<Instant> = None;
        let mut stopping = false; // the others were told to stop after a failure
        loop {
            for (rank, child) in self.children.iter_mut().enumerate() {
                if status[rank].is_none() {
                    status[rank] = child.try_wait().ok().flatten();
                    if let Some(exit) = status[rank].filter(|e| !e.success()) {
                        first_failure = first_failure.or(Some((rank, exit)));
                    }
                }
            }
            if first_failure.is_some() && passed_on.is_empty() && !stopping {
                stopping = true;
                kill_at = Some(Instant::now() + self.grace);
                self.signal_running(&status, libc::SIGTERM);
            }
            if status.iter().all(Option::is_some) {
                break;
            }
            if let Some(signal) = pending_signal().filter(|s| !passed_on.contains(s)) {
                passed_on.push(signal);
                self.signal_running(&status, signal);
            }
            if kill_at.is_some_and(|at| Instant::now() >= at) {
                kill_at = None;
                self.signal_running(&status, libc::SIGKILL);
            }
            std::thread::sleep(POLL);
        }
        // Whatever a rank started and left behind in its group goes with it.
        self.signal_all(libc::SIGKILL);
        self.finish_output();
        match first_failure {
            None => Finished {
                code: 0,
                message: None,
            },
            Some((rank, exit)) => describe_failure(rank, exit, &passed_on),
        }
    }

    fn signal_running(&self, status: &[Option<ExitStatus>], signal: i32) {
        for (child, exit) in self.children.iter().zip(status) {
            if exit.is_none() {
                signal_group(child, signal);
            }
        }
    }

    fn signal_all(&self, signal: i32) {
        for child in &self.children {
            signal_group(child, signal);
        }
    }

    fn reap_all(&mut self) {
        for child in &mut self.children {
            let _ = child.wait();
        }
    }

    /// Lets the output threads write the last lines. A pipe still held open by a process
    /// that left its group is not waited for beyond a second.
    fn finish_output(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        for handle in self.output.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

fn describe_failure(rank: usize, exit: ExitStatus, passed_on: &[i32]) -> Finished {
    use std::os::unix::process::ExitStatusExt;
    let after = match passed_on.first() {
        Some(&signal) => format!(" after {} was passed on to the ranks", signal_name(signal)),
        None => "; the other ranks were stopped".to_string(),
    };
    match (exit.code(), exit.signal()) {
        (Some(code), _) => Finished {
            code,
            message: Some(format!("rank {rank} exited with code {code}{after}")),
        },
        (None, Some(signal)) => Finished {
            code: if passed_on.contains(&signal) {
                128 + signal
            } else {
                1
            },
            message: Some(format!(
                "rank {rank} was killed by {}{after}",
                signal_name(signal)
            )),
        },
        (None, None) => Finished {
            code: 1,
            message: Some(format!("rank {rank} ended without an exit code{after}")),
        },
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    format!("signal {signal} ({name})")
}

/// Sends `signal` to the process group a supervised child leads; a group already gone is
/// not an error.
fn signal_group(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), signal);
    }
}

fn configure_child(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid is async-signal-safe and called before the fork.
        let parent = unsafe { libc::getpid() };
        // SAFETY: between fork and exec only async-signal-safe calls: prctl and getppid.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the parent rcx has exited"));
                }
                Ok(())
            });
        }
    }
}

/// Copies `source` to `sink` a line at a time (a line ends at a newline or a carriage return,
/// kept), each prefixed, each in one write so that lines from several ranks do not mix.
fn copy_lines(mut source: impl Read, prefix: &str, sink: &mut impl Write) {
    let mut pending: Vec<u8> = Vec::new(); // [bytes of the unfinished line]
    let mut chunk = [0u8; 8192];
    loop {
        let n = match source.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &byte in &chunk[..n] {
            pending.push(byte);
            if byte == b'\n' || byte == b'\r' {
                write_line(sink, prefix, &pending);
                pending.clear();
            }
        }
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        write_line(sink, prefix, &pending);
    }
}

fn write_line(sink: &mut impl Write, prefix: &str, line: &[u8]) {
    let mut whole = Vec::with_capacity(prefix.len() + line.len());
    whole.extend_from_slice(prefix.as_bytes());
    whole.extend_from_slice(line);
    let _ = sink.write_all(&whole);
    let _ = sink.flush();
}
