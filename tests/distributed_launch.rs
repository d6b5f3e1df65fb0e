//! Starting a run over several processes: the launcher's variables (every malformed one a
//! one-line bad-input error), the rendezvous on loopback (ranks as threads), the control
//! channel, and the supervisor of `--nproc` on plain commands.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use rcx::distributed::Rank;
use rcx::distributed::launch::{
    Init, Supervisor, WorldEnv, parse_init, run_local, world_from_env, world_from_vars,
};
use rcx::distributed::rendezvous::{Control, UniqueId, join};
use rcx::error::{Error, Result};

fn world(vars: &[(&str, &str)], init: Option<&str>) -> Result<Option<WorldEnv>> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    world_from_vars(&|name| map.get(name).cloned(), init)
}

const MASTER: [(&str, &str); 2] = [("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")];

fn with_master(vars: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    vars.iter().chain(MASTER.iter()).copied().collect()
}

#[test]
fn torchrun_variables_give_rank_and_master() {
    let env = world(
        &with_master(&[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")]),
        None,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        env.rank,
        Rank {
            rank: 5,
            world_size: 8,
            local_rank: 1
        }
    );
    assert_eq!(
        env.init,
        Init::Tcp {
            addr: "node7".into(),
            port: 29500
        }
    );
}

#[test]
fn under_torchruns_agent_store_rank_0_takes_the_next_port() {
    let mut vars = with_master(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
    let env = world(&vars, None).unwrap().unwrap();
    assert_eq!(
        env.init,
        Init::Tcp {
            addr: "node7".into(),
            port: 29501
        }
    );
    // --init is taken as written.
    let env = world(&vars, Some("tcp://node7:29500")).unwrap().unwrap();
    assert_eq!(
        env.init,
        Init::Tcp {
            addr: "node7".into(),
            port: 29500
        }
    );
    let at_the_top = [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "n"),
        ("MASTER_PORT", "65535"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ];
    let message = world(&at_the_top, None).unwrap_err().to_string();
    assert!(
        message.contains("MASTER_PORT=65535: under torchrun"),
        "{message}"
    );
}

#[test]
fn slurm_variables_give_rank_when_torchrun_is_absent() {
    let slurm = [
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "3"),
    ];
    let env = world(&with_master(&slurm), None).unwrap().unwrap();
    assert_eq!(
        env.rank,
        Rank {
            rank: 3,
            world_size: 4,
            local_rank: 3
        }
    );
    // Slurm sets no MASTER_*: --init is enough.
    let env = world(&slurm, Some("file:/shared/run1")).unwrap().unwrap();
    assert_eq!(env.init, Init::File(PathBuf::from("/shared/run1")));
    // torchrun's variables win over Slurm's (torchrun inside an srun step).
    let mut both = with_master(&slurm);
    both.extend([("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    assert_eq!(world(&both, None).unwrap().unwrap().rank.world_size, 2);
}

#[test]
fn init_flag_overrides_master_variables() {
    let vars = with_master(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]);
    let env = world(&vars, Some("tcp://10.0.0.2:1234")).unwrap().unwrap();
    assert_eq!(
        env.init,
        Init::Tcp {
            addr: "10.0.0.2".into(),
            port: 1234
        }
    );
    let env = world(&vars, Some("tcp://[::1]:29400")).unwrap().unwrap();
    assert_eq!(
        env.init,
        Init::Tcp {
            addr: "::1".into(),
            port: 29400
        }
    );
    assert_eq!(
        parse_init("file:rdv").unwrap(),
        Init::File(PathBuf::from("rdv"))
    );
}

#[test]
fn no_launcher_or_a_world_of_one_is_a_single_process() {
    assert!(world(&MASTER, None).unwrap().is_none());
    let one = [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")];
    assert!(world(&one, None).unwrap().is_none());
    let srun_one = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
        ("SLURM_LOCALID", "0"),
    ];
    assert!(world(&srun_one, None).unwrap().is_none());
}

#[test]
fn every_malformed_variable_is_a_one_line_bad_input_error() {
    let torch = |rank: &'static str, size: &'static str, local: &'static str| {
        with_master(&[("RANK", rank), ("WORLD_SIZE", size), ("LOCAL_RANK", local)])
    };
    let ok = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")];
    // (the variables, --init, what the message says)
    type Case = (
        Vec<(&'static str, &'static str)>,
        Option<&'static str>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            with_master(&[("RANK", "1")]),
            None,
            "WORLD_SIZE is not set, but RANK is",
        ),
        (
            with_master(&[("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]),
            None,
            "RANK is not set",
        ),
        (
            with_master(&[("RANK", "1"), ("WORLD_SIZE", "2")]),
            None,
            "LOCAL_RANK is not set",
        ),
        (
            torch("one", "2", "0"),
            None,
            "RANK=\"one\": expected a non-negative whole number",
        ),
        (
            torch("-1", "2", "0"),
            None,
            "RANK=\"-1\": expected a non-negative whole number",
        ),
        (
            torch("0", "2.0", "0"),
            None,
            "WORLD_SIZE=\"2.0\": expected a non-negative",
        ),
        (
            torch("0", "0", "0"),
            None,
            "WORLD_SIZE=0: expected at least 1 process",
        ),
        (
            torch("4", "4", "0"),
            None,
            "RANK=4: expected a rank below WORLD_SIZE=4",
        ),
        (
            torch("1", "4", "4"),
            None,
            "LOCAL_RANK=4: expected a local rank below WORLD_SIZE=4",
        ),
        (
            vec![("SLURM_PROCID", "1"), ("SLURM_LOCALID", "0")],
            None,
            "SLURM_NTASKS is not set, but SLURM_PROCID and SLURM_LOCALID are",
        ),
        (
            vec![
                ("SLURM_PROCID", "2"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_LOCALID", "0"),
            ],
            None,
            "SLURM_PROCID=2: expected a rank below SLURM_NTASKS=2",
        ),
        (ok.to_vec(), None, "MASTER_ADDR is not set"),
        (
            [&ok[..], &[("MASTER_ADDR", "node7")]].concat(),
            None,
            "MASTER_PORT is not set: expected MASTER_ADDR and MASTER_PORT",
        ),
        (
            [&ok[..], &[("MASTER_ADDR", " "), ("MASTER_PORT", "29500")]].concat(),
            None,
            "MASTER_ADDR is empty",
        ),
        (
            [&ok[..], &[("MASTER_ADDR", "n"), ("MASTER_PORT", "0")]].concat(),
            None,
            "MASTER_PORT=\"0\": expected a port number from 1 to 65535",
        ),
        (
            [&ok[..], &[("MASTER_ADDR", "n"), ("MASTER_PORT", "65536")]].concat(),
            None,
            "MASTER_PORT=\"65536\": expected a port number from 1 to 65535",
        ),
        (
            [&ok[..], &[("MASTER_ADDR", "n"), ("MASTER_PORT", "http")]].concat(),
            None,
            "MASTER_PORT=\"http\": expected a port number",
        ),
        (
            ok.to_vec(),
            Some("http://n:1"),
            "--init http://n:1: expected tcp://HOST:PORT or file:PATH",
        ),
        (
            ok.to_vec(),
            Some("tcp://node7"),
            "--init tcp://node7: no port",
        ),
        (
            ok.to_vec(),
            Some("tcp://:29500"),
            "--init tcp://:29500: no host",
        ),
        (
            ok.to_vec(),
            Some("tcp://n:0"),
            "--init tcp://n:0: expected a port number from 1",
        ),
        (ok.to_vec(), Some("file:"), "--init file:: expected a path"),
        (
            MASTER.to_vec(),
            Some("file:/x"),
            "--init file:/x: no launcher variables are set",
        ),
    ];
    for (vars, init, expected) in cases {
        match world(&vars, init) {
            Err(e @ Error::User(_)) => {
                let message = e.to_string();
                assert!(message.contains(expected), "{vars:?} {init:?}: {message}");
                assert!(!message.contains('\n'), "one line: {message}");
                assert_eq!(e.exit_code(), 2);
            }
            other => panic!("{vars:?} {init:?}: expected a bad-input error, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- rendezvous

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tcp_env(rank: usize, world_size: usize, port: u16) -> WorldEnv {
    let init = Init::Tcp {
        addr: "127.0.0.1".into(),
        port,
    };
    WorldEnv {
        rank: Rank {
            rank,
            world_size,
            local_rank: rank,
        },
        init,
    }
}

fn the_id() -> UniqueId {
    let mut id = [0u8; 128];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = (i * 7 + 3) as u8;
    }
    id
}

/// Runs `join` for each environment on its own thread; rank 0 starts `rank0_delay` after the
/// others, so that they must retry.
fn join_all(
    envs: Vec<WorldEnv>,
    timeout: Duration,
    rank0_delay: Duration,
) -> Vec<Result<(UniqueId, Control)>> {
    let handles: Vec<_> = envs
        .into_iter()
        .map(|env| {
            thread::spawn(move || {
                if env.rank.rank == 0 {
                    thread::sleep(rank0_delay);
                }
                join(&env, || Ok(the_id()), timeout)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn error_of(result: &Result<(UniqueId, Control)>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn three_ranks_get_rank_0s_id_and_meet_at_barriers() {
    let port = free_port();
    let envs = (0..3).map(|r| tcp_env(r, 3, port)).collect();
    let results = join_all(envs, Duration::from_secs(10), Duration::from_millis(300));
    let controls: Vec<Control> = results
        .into_iter()
        .map(|r| {
            let (id, control) = r.unwrap();
            assert_eq!(id, the_id());
            control
        })
        .collect();
    // Two barriers, then the last one; every rank passes each only when all have arrived.
    let handles: Vec<_> = controls
        .into_iter()
        .enumerate()
        .map(|(rank, control)| {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(100 * rank as u64));
                let start = Instant::now();
                control.barrier(Duration::from_secs(5)).unwrap();
                let waited = start.elapsed();
                control.barrier(Duration::from_secs(5)).unwrap();
                assert!(control.peer_lost().is_none());
                control.finish(Duration::from_secs(5)).unwrap();
                (rank, waited)
            })
        })
        .collect();
    for handle in handles {
        let (rank, waited) = handle.join().unwrap();
        // Rank 2 arrives 200 ms after rank 0, which must have waited for it.
        if rank == 0 {
            assert!(
                waited >= Duration::from_millis(150),
                "rank 0 waited {waited:?}"
            );
        }
    }
}

#[test]
fn a_missing_rank_is_named_by_rank_0_within_the_timeout() {
    let port = free_port();
    let start = Instant::now();
    let results = join_all(
        vec![tcp_env(0, 3, port), tcp_env(1, 3, port)],
        Duration::from_secs(1),
        Duration::ZERO,
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let rank0 = error_of(&results[0]);
    assert!(
        rank0.contains("these ranks never arrived: 2 (of world size 3)"),
        "{rank0}"
    );
    assert!(rank0.contains(&format!("127.0.0.1:{port}")), "{rank0}");
    let rank1 = error_of(&results[1]);
    assert!(
        rank1.contains("rank 1: refused by rank 0: rank 0 waited"),
        "{rank1}"
    );
    assert!(rank1.contains("never arrived: 2"), "{rank1}");
}

#[test]
fn a_rank_without_rank_0_names_master_addr_and_port() {
    let port = free_port();
    let start = Instant::now();
    let result = join(
        &tcp_env(2, 3, port),
        || Ok(the_id()),
        Duration::from_secs(1),
    );
    let message = error_of(&result);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        message.contains(&format!(
            "rank 2 could not reach rank 0 at 127.0.0.1:{port} (MASTER_ADDR, MASTER_PORT or --init) within 1 s"
        )),
        "{message}"
    );
}

#[test]
fn differing_world_sizes_fail_every_rank() {
    let port = free_port();
    let results = join_all(
        vec![tcp_env(0, 2, port), tcp_env(1, 3, port)],
        Duration::from_secs(5),
        Duration::ZERO,
    );
    for result in &results {
        let message = error_of(result);
        assert!(message.contains("rank 1 (127.0.0.1:"), "{message}");
        assert!(
            message.contains("has world size 3, rank 0 has 2"),
            "{message}"
        );
    }
    assert!(matches!(results[0], Err(Error::User(_))));
    assert!(matches!(results[1], Err(Error::User(_))));
}

#[test]
fn a_rank_started_twice_fails_the_run() {
    let port = free_port();
    let results = join_all(
        vec![
            tcp_env(0, 3, port),
            tcp_env(1, 3, port),
            tcp_env(1, 3, port),
        ],
        Duration::from_secs(5),
        Duration::from_millis(200),
    );
    let rank0 = error_of(&results[0]);
    assert!(rank0.contains("rank 1 arrived twice"), "{rank0}");
    for result in &results[1..] {
        let message = error_of(result);
        assert!(
            message.contains("refused by rank 0: rank 1 arrived twice"),
            "{message}"
        );
    }
    // A second rank 0 is refused likewise.
    let port = free_port();
    let rank0 = thread::spawn(move || {
        join(
            &tcp_env(0, 2, port),
            || Ok(the_id()),
            Duration::from_secs(5),
        )
    });
    thread::sleep(Duration::from_millis(200));
    let mut impostor = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut hello = b"RCXR".to_vec();
    for word in [1u32, 0, 2] {
        hello.extend_from_slice(&word.to_le_bytes());
    }
    std::io::Write::write_all(&mut impostor, &hello).unwrap();
    let message = error_of(&rank0.join().unwrap());
    assert!(message.contains("claims rank 0"), "{message}");
}

#[test]
fn file_init_ignores_a_stale_file_and_removes_its_own() {
    let dir = std::env::temp_dir().join(format!("rcx-rdv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rendezvous");
    // An earlier run's file: the port it names has nobody listening any more.
    let dead = free_port();
    std::fs::write(
        &path,
        format!("rcx-rendezvous 1\nhost 127.0.0.1\nport {dead}\nworld_size 3\n"),
    )
    .unwrap();
    let envs = (0..3)
        .map(|r| WorldEnv {
            rank: Rank {
                rank: r,
                world_size: 3,
                local_rank: r,
            },
            init: Init::File(path.clone()),
        })
        .collect();
    let results = join_all(envs, Duration::from_secs(10), Duration::from_millis(500));
    for result in results {
        assert_eq!(result.unwrap().0, the_id());
    }
    assert!(
        !path.exists(),
        "rank 0 removes the file once everyone has arrived"
    );
    // Without rank 0 the others wait out the timeout naming the file.
    let result = join(
        &WorldEnv {
            rank: Rank {
                rank: 1,
                world_size: 2,
                local_rank: 1,
            },
            init: Init::File(path.clone()),
        },
        || Ok(the_id()),
        Duration::from_millis(500),
    );
    let message = error_of(&result);
    assert!(
        message.contains(&format!(
            "could not reach rank 0 through {}",
            path.display()
        )),
        "{message}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_control_channel_notices_a_rank_that_is_gone() {
    let port = free_port();
    let envs = (0..3).map(|r| tcp_env(r, 3, port)).collect();
    let mut controls: Vec<Control> = join_all(envs, Duration::from_secs(10), Duration::ZERO)
        .into_iter()
        .map(|r| r.unwrap().1)
        .collect();
    assert!(controls.iter().all(|c| c.peer_lost().is_none()));
    // Rank 2 ends without the last barrier (a crash closes its socket the same way).
    drop(controls.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    while controls.iter().any(|c| c.peer_lost().is_none()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let rank0 = controls[0].peer_lost().expect("rank 0 notices");
    assert!(rank0.starts_with("rank 2 (127.0.0.1:"), "{rank0}");
    assert!(rank0.contains("closed its control connection"), "{rank0}");
    let rank1 = controls[1].peer_lost().expect("rank 1 is told");
    assert!(rank1.contains("rank 2 is gone"), "{rank1}");
    // A barrier now fails at once instead of waiting for rank 2.
    let start = Instant::now();
    let message = controls[0]
        .barrier(Duration::from_secs(10))
        .unwrap_err()
        .to_string();
    assert!(message.contains("rank 2"), "{message}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

// ---------------------------------------------------------------- the supervisor

fn sh(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.args(["-c", script]);
    command
}

/// Whether the process group `pid` led has no running process left within a second. A
/// process killed after its parent is reparented to init and stays a zombie (dead, holding
/// no resources) until init reaps it, which some container inits never do: zombies count as
/// gone.
fn group_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let running = running_in_group(pid);
        if running.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!("still running in group {pid}: {running:?}");
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The processes of group `group` that are not zombies, from /proc/PID/stat ("pid (comm)
/// state ppid pgrp ...").
fn running_in_group(group: u32) -> Vec<String> {
    let mut running = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, fields)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        if fields.get(2) == Some(&group.to_string().as_str()) && fields[0] != "Z" {
            running.push(stat);
        }
    }
    running
}

#[test]
fn supervisor_returns_0_when_every_process_succeeds() {
    let supervisor = Supervisor::spawn(
        vec![sh("echo one"), sh("exit 0"), sh("sleep 0.2")],
        Duration::from_secs(1),
    )
    .unwrap();
    let finished = supervisor.wait(&|| None);
    assert_eq!(finished.code, 0);
    assert_eq!(finished.message, None);
}

#[test]
fn supervisor_stops_the_others_when_one_fails() {
    // Rank 0 sleeps in a child of its shell, so the whole group must go.
    let supervisor = Supervisor::spawn(
        vec![sh("sleep 30; true"), sh("sleep 0.3; exit 3")],
        Duration::from_secs(2),
    )
    .unwrap();
    let pids = supervisor.pids();
    let start = Instant::now();
    let finished = supervisor.wait(&|| None);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(finished.code, 3);
    assert_eq!(
        finished.message.as_deref(),
        Some("rank 1 exited with code 3; the other ranks were stopped")
    );
    for pid in pids {
        assert!(group_gone(pid), "process group {pid} is still alive");
    }
}

#[test]
fn supervisor_kills_a_process_that_ignores_sigterm_after_the_grace_period() {
    let supervisor = Supervisor::spawn(
        vec![
            sh("trap '' TERM; sleep 30; true"),
            sh("sleep 0.2; kill -9 $$"),
        ],
        Duration::from_millis(500),
    )
    .unwrap();
    let pids = supervisor.pids();
    let start = Instant::now();
    let finished = supervisor.wait(&|| None);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    assert_eq!(finished.code, 1);
    assert_eq!(
        finished.message.as_deref(),
        Some("rank 1 was killed by signal 9 (SIGKILL); the other ranks were stopped")
    );
    assert!(
        group_gone(pids[0]),
        "process group {} is still alive",
        pids[0]
    );
}

#[test]
fn supervisor_passes_a_signal_on_and_waits_for_every_process() {
    let supervisor = Supervisor::spawn(
        vec![
            sh("trap 'sleep 0.3; exit 130' INT; sleep 30 & wait"),
            sh("sleep 30"),
        ],
        Duration::from_millis(100),
    )
    .unwrap();
    let start = Instant::now();
    let signal_after = Duration::from_millis(300);
    let finished = supervisor.wait(&|| (start.elapsed() >= signal_after).then_some(libc::SIGINT));
    let took = start.elapsed();
    // Rank 1 dies of the signal at once; rank 0 is not stopped but left to finish (0.3 s).
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    assert_eq!(finished.code, 128 + libc::SIGINT);
    assert_eq!(
        finished.message.as_deref(),
        Some(
            "rank 1 was killed by signal 2 (SIGINT) after signal 2 (SIGINT) was passed on to the ranks"
        )
    );
}

#[test]
fn supervisor_names_a_command_that_cannot_start() {
    let commands = vec![sh("sleep 30"), Command::new("/nonexistent/rcx-test-binary")];
    let message = match Supervisor::spawn(commands, Duration::from_secs(1)) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.starts_with("cannot start rank 1 (/nonexistent/rcx-test-binary)"),
        "{message}"
    );
}

// ---------------------------------------------------------------- run_local end to end

/// What a rank started by the run_local tests does: this test binary, run again by
/// `run_local` with the launcher's variables set, on one of the two tests below.
fn rank_process(fail_rank: Option<usize>) {
    let Some(env) = world_from_env(None).unwrap() else {
        eprintln!("skipped: no RANK or WORLD_SIZE set; this is a rank of the run_local tests");
        return;
    };
    assert!(matches!(&env.init, Init::Tcp { addr, .. } if addr == "127.0.0.1"));
    assert_eq!(env.rank.world_size, 3);
    assert_eq!(env.rank.local_rank, env.rank.rank);
    let (id, control) = join(&env, || Ok(the_id()), Duration::from_secs(10)).unwrap();
    assert_eq!(id, the_id());
    if fail_rank == Some(env.rank.rank) {
        std::process::exit(3);
    }
    control.finish(Duration::from_secs(10)).unwrap();
}

#[test]
#[ignore = "a rank of run_local_starts_ranks_that_meet; run by that test only"]
fn rank_process_joins() {
    rank_process(None);
}

#[test]
#[ignore = "a rank of run_local_returns_a_failed_ranks_code; run by that test only"]
fn rank_process_rank_1_exits_3() {
    rank_process(Some(1));
}

fn rank_args(test: &str) -> Vec<std::ffi::OsString> {
    [test, "--exact", "--ignored", "--test-threads=1"]
        .iter()
        .map(Into::into)
        .collect()
}

#[test]
fn run_local_starts_ranks_that_meet() {
    let code = run_local(3, &rank_args("rank_process_joins"), Duration::from_secs(2)).unwrap();
    assert_eq!(code, 0);
}

#[test]
fn run_local_returns_a_failed_ranks_code() {
    let start = Instant::now();
    let code = run_local(
        3,
        &rank_args("rank_process_rank_1_exits_3"),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(code, 3);
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "took {:?}",
        start.elapsed()
    );
    assert!(run_local(0, &[], Duration::from_secs(1)).is_err());
}
