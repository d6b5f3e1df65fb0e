//! rcx's NCCL communicator (src/backend/cuda/nccl.rs) across rank PROCESSES, as a
//! data-parallel run uses it: each test reruns this test binary once per rank (the same test,
//! with the rank, the world size and an id file in its environment); rank 0 makes the NCCL
//! id and writes the file, the others read it.
//!
//! Without a GPU the ranks run on the emulated device (tests/emu/fake_device.rs), whose fake
//! libnccl (kernels/emu/fake_nccl.cpp) exchanges through shared memory; RCX_REQUIRE_EMU=1
//! (CI) turns a missing emulator into a failure. With GPUs the ranks take one each (skipped,
//! saying why, when there are fewer GPUs than ranks or no libnccl); the checks of a failure's
//! wording, and the mismatched collective (NCCL itself does not check calls), are the
//! emulator's alone.
//!
//! Checked: all-reduce (sum, in place, on a slice and on a view, over several of the
//! emulator's 1 MiB chunks; max, min, prod, avg; f64, bf16, f16, i32, i64, u8),
//! reduce-scatter, all-gather (both out of place and in place), broadcast, reduce, the f64
//! host sum, on 2 and 3 ranks, against sums computed here from every rank's seeded random
//! non-zero inputs; a mismatched collective fails on every rank within seconds; a killed
//! rank, a rank that stops calling and a rank that never arrives end the others with an
//! error naming it, within the timeout.

#[path = "emu/build.rs"]
mod emu_build;
// This file uses `library_path`, not the rerun of a whole test binary.
#[allow(dead_code)]
#[path = "emu/fake_device.rs"]
mod fake_device;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::CudaSlice;
use rcx::backend::cuda::CudaRuntime;
use rcx::backend::cuda::nccl::{self, Communicator, Reduction};

const RANK: &str = "RCX_NCCL_TEST_RANK";
const WORLD: &str = "RCX_NCCL_TEST_WORLD";
const ID_FILE: &str = "RCX_NCCL_TEST_ID_FILE";
/// A rank process's whole life, at most (a hang fails the test instead of blocking it).
const RANK_DEADLINE: Duration = Duration::from_secs(180);

/// This process's part when a test started it as a rank.
struct RankEnv {
    rank: usize,
    world: usize,
    id_file: PathBuf,
}

fn rank_env() -> Option<RankEnv> {
    let var = |name| std::env::var(name).ok();
    Some(RankEnv {
        rank: var(RANK)?.parse().expect(RANK),
        world: var(WORLD)?.parse().expect(WORLD),
        id_file: PathBuf::from(var(ID_FILE)?),
    })
}

/// Where the ranks run.
enum Place {
    /// On the emulated device: this LD_LIBRARY_PATH.
    Emulated(String),
    /// One GPU per rank.
    Gpus,
}

impl Place {
    fn emulated(&self) -> bool {
        matches!(self, Place::Emulated(_))
    }
}

/// Where `world` ranks can run, or None after printing why the test is skipped.
fn place(test: &str, world: usize) -> Option<Place> {
    if rcx::backend::cuda::available().is_ok() {
        if let Err(why) = nccl::available() {
            eprintln!("{test}: skipped, a GPU but no NCCL: {why}");
            return None;
        }
        let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
        if gpus < world {
            eprintln!("{test}: skipped, {world} ranks need {world} GPUs, this machine has {gpus}");
            return None;
        }
        return Some(Place::Gpus);
    }
    match fake_device::library_path() {
        Ok(path) => Some(Place::Emulated(path)),
        Err(why) => {
            assert!(
                std::env::var("RCX_REQUIRE_EMU").map_or(true, |v| v != "1"),
                "{test}: RCX_REQUIRE_EMU=1 but the emulated device is unavailable: {why}"
            );
            eprintln!("{test}: skipped, no GPU and no emulated device: {why}");
            None
        }
    }
}

/// How one rank process ended.
struct Outcome {
    rank: usize,
    status: ExitStatus,
    output: String,
}

/// Runs `ranks` of a `world`-rank communicator as processes rerunning `test`, with `env`
/// added; waits for all of them (reaping each as soon as it ends, as a launcher does).
fn run_ranks(
    test: &str,
    place: &Place,
    world: usize,
    ranks: &[usize],
    env: &[(&str, &str)],
) -> Vec<Outcome> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nccl-{test}-{world}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the ranks' directory");
    let id_file = dir.join("nccl-id");
    let exe = std::env::current_exe().expect("the test binary");
    let mut children = Vec::new();
    for &rank in ranks {
        let log = dir.join(format!("rank-{rank}.log"));
        let out = std::fs::File::create(&log).expect("a rank's log");
        let mut command = Command::new(&exe);
        command
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(RANK, rank.to_string())
            .env(WORLD, world.to_string())
            .env(ID_FILE, &id_file)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("a rank's log"))
            .stderr(out);
        if let Place::Emulated(path) = place {
            command
                .env("LD_LIBRARY_PATH", path)
                .env(fake_device::EMULATED, "1")
                .env("RCX_EMU_DEVICES", world.to_string());
        }
        children.push((rank, log, command.spawn().expect("start a rank")));
    }
    let started = Instant::now();
    let mut outcomes = Vec::new();
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            if let Some(status) = children[i].2.try_wait().expect("wait for a rank") {
                let (rank, log, _) = children.remove(i);
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                outcomes.push(Outcome {
                    rank,
                    status,
                    output,
                });
            } else {
                i += 1;
            }
        }
        if started.elapsed() > RANK_DEADLINE {
            for (_, _, child) in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("{test}: ranks still running after {RANK_DEADLINE:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The fake NCCL names its shared-memory segment in the id (bytes 8.., up to a NUL);
    // the last rank to leave must have unlinked it (shm_open's names live in /dev/shm).
    if let (Place::Emulated(_), Ok(id)) = (place, std::fs::read(&id_file)) {
        let name: Vec<u8> = id[8..].iter().copied().take_while(|&b| b != 0).collect();
        let segment =
            Path::new("/dev/shm").join(String::from_utf8_lossy(&name).trim_start_matches('/'));
        assert!(
            name.starts_with(b"/") && !segment.exists(),
            "{test}: the fake NCCL's segment {} was left behind",
            segment.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcomes.sort_by_key(|o| o.rank);
    outcomes
}

/// Asserts that every rank but those in `killed` exited successfully (and those were killed).
fn assert_ranks(test: &str, outcomes: &[Outcome], killed: &[usize]) {
    use std::os::unix::process::ExitStatusExt;
    for o in outcomes {
        let ok = if killed.contains(&o.rank) {
            o.status.signal() == Some(libc::SIGKILL)
        } else {
            o.status.success()
        };
        assert!(
            ok,
            "{test}: rank {} ended with {}:\n{}",
            o.rank, o.status, o.output
        );
        // What the rank says it did: its test ran (a name that matched nothing would pass).
        let tag = format!("rank {}: ", o.rank);
        let said = o
            .output
            .lines()
            .find_map(|l| l.find(&tag).map(|at| &l[at..]));
        if !killed.contains(&o.rank) {
            assert!(
                said.is_some() && o.output.contains("test result: ok. 1 passed"),
                "{test}: rank {} did not run the test:\n{}",
                o.rank,
                o.output
            );
        }
        eprintln!(
            "{test}: rank {} ({}) {}",
            o.rank,
            o.status,
            said.unwrap_or("")
        );
    }
}

/// The id file's 128 bytes: written by rank 0 (renamed into place whole), polled by the others.
/// With `all_ready`, rank 0 first waits for every other rank's `ready-<rank>` file, written
/// once its device is open, so that the ranks ask for the communicator together (the
/// emulator's short timeouts in some tests start there).
fn exchange_id(env: &RankEnv, all_ready: bool) -> [u8; 128] {
    let poll = |what: &str, path: &Path| {
        let started = Instant::now();
        loop {
            if let Ok(bytes) = std::fs::read(path) {
                return bytes;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "rank {}: no {what} ({})",
                env.rank,
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let ready = |rank: usize| env.id_file.with_extension(format!("ready-{rank}"));
    if env.rank != 0 {
        std::fs::write(ready(env.rank), b"").expect("write a ready file");
        return poll("id from rank 0", &env.id_file)
            .try_into()
            .expect("an id of 128 bytes");
    }
    if all_ready {
        for rank in 1..env.world {
            poll("ready file", &ready(rank));
        }
    }
    let id = nccl::unique_id().unwrap_or_else(|e| panic!("{e}"));
    let partial = env.id_file.with_extension("partial");
    std::fs::write(&partial, id).expect("write the id");
    std::fs::rename(&partial, &env.id_file).expect("publish the id");
    id
}

/// This rank's device (one per rank) and its communicator.
fn join(env: &RankEnv, timeout: Duration) -> (Arc<CudaRuntime>, Communicator) {
    let rt = Arc::new(CudaRuntime::new(env.rank).unwrap_or_else(|e| panic!("{e}")));
    let id = exchange_id(env, true);
    let comm =
        Communicator::new(&rt, &id, env.rank, env.world, timeout).unwrap_or_else(|e| panic!("{e}"));
    (rt, comm)
}

/// Rank `rank`'s inputs: seeded, uniform in (-1, 1), never zero (splitmix64).
fn inputs(rank: usize, salt: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (rank as u64 + 1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(salt << 32)
                .wrapping_add(i.wrapping_mul(0xbf58_476d_1ce4_e5b9));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            2.0 * u - 1.0 + 1.0 / (1u64 << 25) as f32 // (-1, 1), not 0
        })
        .collect()
}

/// Element i of the sum over `world` ranks of `inputs(_, salt, n)`, computed in f64.
fn sums(world: usize, salt: u64, n: usize) -> Vec<f64> {
    let mut total = vec![0f64; n];
    for rank in 0..world {
        for (t, x) in total.iter_mut().zip(inputs(rank, salt, n)) {
            *t += x as f64;
        }
    }
    total
}

/// `got` equals `want` within f32 rounding of a sum of a few terms in (-1, 1): 1e-6.
fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-6,
            "{what}: element {i} is {g}, the sum over the ranks is {w}"
        );
    }
}

fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
    rt: &CudaRuntime,
    buf: &CudaSlice<T>,
) -> Vec<T> {
    rt.download(buf).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn collectives_match_the_sums_over_2_and_3_rank_processes() {
    let test = "collectives_match_the_sums_over_2_and_3_rank_processes";
    if let Some(env) = rank_env() {
        return collectives_on_this_rank(&env);
    }
    for world in [2, 3] {
        let Some(place) = place(test, world) else {
            return;
        };
        let ranks: Vec<usize> = (0..world).collect();
        let outcomes = run_ranks(test, &place, world, &ranks, &[]);
        assert_ranks(test, &outcomes, &[]);
    }
}

fn collectives_on_this_rank(env: &RankEnv) {
    let (rank, world) = (env.rank, env.world);
    let (rt, mut comm) = join(env, Duration::from_secs(60));
    let rt = &*rt;
    let upload = |x: &[f32]| rt.upload(x).unwrap_or_else(|e| panic!("{e}"));
    let check = |r: rcx::error::Result<()>| r.unwrap_or_else(|e| panic!("{e}"));

    // All-reduce in place: a whole slice; a view, whose surroundings stay; 1.2 MB, more
    // than one of the emulator's chunks.
    let mut whole = upload(&inputs(rank, 1, 1000));
    check(comm.all_reduce_sum(&mut whole));
    assert_close("all-reduce", &download(rt, &whole), &sums(world, 1, 1000));
    let mut host = inputs(rank, 2, 1000);
    let mut buf = upload(&host);
    check(comm.all_reduce_sum(&mut buf.slice_mut(100..600)));
    let want = sums(world, 2, 1000);
    let got = download(rt, &buf);
    assert_close("all-reduce of a view", &got[100..600], &want[100..600]);
    host[100..600].copy_from_slice(&got[100..600]);
    assert_eq!(got, host, "all-reduce of a view wrote outside it");
    let mut big = upload(&inputs(rank, 3, 300_000));
    check(comm.all_reduce_sum(&mut big));
    assert_close(
        "all-reduce of 300000",
        &download(rt, &big),
        &sums(world, 3, 300_000),
    );

    // The other reductions, over every rank's inputs.
    let all: Vec<Vec<f32>> = (0..world).map(|r| inputs(r, 4, 64)).collect();
    for reduction in [
        Reduction::Max,
        Reduction::Min,
        Reduction::Prod,
        Reduction::Avg,
    ] {
        let mut buf = upload(&all[rank]);
        check(comm.all_reduce(&mut buf, reduction));
        let want: Vec<f64> = (0..64)
            .map(|i| {
                let column = all.iter().map(|x| x[i] as f64);
                match reduction {
                    Reduction::Max => column.fold(f64::MIN, f64::max),
                    Reduction::Min => column.fold(f64::MAX, f64::min),
                    Reduction::Prod => column.product(),
                    _ => column.sum::<f64>() / world as f64,
                }
            })
            .collect();
        assert_close(
            &format!("all-reduce {reduction:?}"),
            &download(rt, &buf),
            &want,
        );
    }

    // Other element types, on values whose sums are exact: (rank + 1) * (i - 20) / 4.
    let exact = |i: usize| (rank as f64 + 1.0) * (i as f64 - 20.0) / 4.0;
    let exact_sum = |i: usize| (world * (world + 1) / 2) as f64 * (i as f64 - 20.0) / 4.0;
    let n = 48;
    let mut f64s = rt.upload(&(0..n).map(exact).collect::<Vec<f64>>()).unwrap();
    check(comm.all_reduce_sum(&mut f64s));
    let want: Vec<f64> = (0..n).map(exact_sum).collect();
    assert_eq!(download(rt, &f64s), want, "all-reduce of f64");
    let mut bf16s = rt
        .upload(
            &(0..n)
                .map(|i| half::bf16::from_f64(exact(i)))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    check(comm.all_reduce_sum(&mut bf16s));
    let got: Vec<f64> = download(rt, &bf16s).iter().map(|x| x.to_f64()).collect();
    assert_eq!(got, want, "all-reduce of bf16");
    let mut f16s = rt
        .upload(
            &(0..n)
                .map(|i| half::f16::from_f64(exact(i)))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    check(comm.all_reduce_sum(&mut f16s));
    let got: Vec<f64> = download(rt, &f16s).iter().map(|x| x.to_f64()).collect();
    assert_eq!(got, want, "all-reduce of f16");
    let ints = |scale: i64| (0..n as i64).map(move |i| (rank as i64 + 1) * (i - 20) * scale);
    let int_sums = |scale: i64| {
        (0..n as i64).map(move |i| (world * (world + 1) / 2) as i64 * (i - 20) * scale)
    };
    let mut i32s = rt
        .upload(&ints(1_000_000).map(|x| x as i32).collect::<Vec<_>>())
        .unwrap();
    check(comm.all_reduce_sum(&mut i32s));
    let want32: Vec<i32> = int_sums(1_000_000).map(|x| x as i32).collect();
    assert_eq!(download(rt, &i32s), want32, "all-reduce of i32");
    let mut i64s = rt.upload(&ints(1 << 40).collect::<Vec<_>>()).unwrap();
    check(comm.all_reduce_sum(&mut i64s));
    assert_eq!(
        download(rt, &i64s),
        int_sums(1 << 40).collect::<Vec<_>>(),
        "all-reduce of i64"
    );
    let mut u8s = rt
        .upload(&(0..n).map(|i| (rank * 7 + i) as u8).collect::<Vec<_>>())
        .unwrap();
    check(comm.all_reduce_sum(&mut u8s));
    let want8: Vec<u8> = (0..n)
        .map(|i| (0..world).map(|r| r * 7 + i).sum::<usize>() as u8)
        .collect();
    assert_eq!(download(rt, &u8s), want8, "all-reduce of u8");

    // Reduce-scatter: rank r gets block r of the sum, out of place and in place.
    let block = 777;
    let send = upload(&inputs(rank, 5, world * block));
    let mut recv = upload(&vec![f32::NAN; block]);
    check(comm.reduce_scatter_sum(&send, &mut recv));
    let want = sums(world, 5, world * block);
    let mine = rank * block..(rank + 1) * block;
    assert_close("reduce-scatter", &download(rt, &recv), &want[mine.clone()]);
    let mut buf = upload(&inputs(rank, 5, world * block));
    check(comm.reduce_scatter_sum_in_place(&mut buf));
    assert_close(
        "in-place reduce-scatter",
        &download(rt, &buf)[mine.clone()],
        &want[mine.clone()],
    );

    // All-gather: every rank gets every rank's inputs in rank order.
    let send = upload(&inputs(rank, 6, block));
    let mut recv = upload(&vec![f32::NAN; world * block]);
    check(comm.all_gather(&send, &mut recv));
    let want: Vec<f32> = (0..world).flat_map(|r| inputs(r, 6, block)).collect();
    assert_eq!(download(rt, &recv), want, "all-gather");
    let mut mixed = vec![f32::NAN; world * block];
    mixed[mine.clone()].copy_from_slice(&inputs(rank, 6, block));
    let mut buf = upload(&mixed);
    check(comm.all_gather_in_place(&mut buf));
    assert_eq!(download(rt, &buf), want, "in-place all-gather");

    // Broadcast from the last rank; reduce (sum) to rank 0, the others unchanged.
    let root = world - 1;
    let mut buf = upload(&inputs(rank, 7, 500));
    check(comm.broadcast(&mut buf, root));
    assert_eq!(download(rt, &buf), inputs(root, 7, 500), "broadcast");
    let mut buf = upload(&inputs(rank, 8, 500));
    check(comm.reduce(&mut buf, Reduction::Sum, 0));
    if rank == 0 {
        assert_close(
            "reduce to rank 0",
            &download(rt, &buf),
            &sums(world, 8, 500),
        );
    } else {
        assert_eq!(
            download(rt, &buf),
            inputs(rank, 8, 500),
            "reduce: a non-root's buffer"
        );
    }

    // A few host numbers, summed exactly.
    let mut values = [rank as f64 + 0.25, 1e12 * (rank as f64 + 1.0), -3.0];
    check(comm.all_reduce_sum_host(&mut values));
    let w = world as f64;
    assert_eq!(
        values,
        [
            w * (w - 1.0) / 2.0 + 0.25 * w,
            1e12 * w * (w + 1.0) / 2.0,
            -3.0 * w
        ]
    );

    // Lengths that do not fit are refused before any rank is involved.
    let err = comm
        .reduce_scatter_sum(&send, &mut upload(&[0.0; 3]))
        .expect_err("a reduce-scatter output of the wrong length");
    assert!(err.to_string().contains("not 1/"), "{err}");
    let mut after = upload(&inputs(rank, 9, 10));
    check(comm.all_reduce_sum(&mut after));
    assert_close(
        "all-reduce after a refused call",
        &download(rt, &after),
        &sums(world, 9, 10),
    );
    println!("rank {rank}: every collective matched");
}

#[test]
fn a_mismatched_collective_fails_on_every_rank_within_seconds() {
    let test = "a_mismatched_collective_fails_on_every_rank_within_seconds";
    if let Some(env) = rank_env() {
        let (rt, mut comm) = join(&env, Duration::from_secs(60));
        let n = if env.rank == 0 { 10 } else { 12 };
        let mut buf = rt.upload(&inputs(env.rank, 1, n)).unwrap();
        let started = Instant::now();
        let err = comm
            .all_reduce_sum(&mut buf)
            .expect_err("all-reduces of 10 and 12 elements");
        let (elapsed, message) = (started.elapsed(), err.to_string());
        // The emulator's timeout is 60 s: an error within 10 s is the check, not the timeout.
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}: {message}");
        for part in ["does not match", "count 10", "count 12", "ncclAllReduce"] {
            assert!(message.contains(part), "no `{part}` in: {message}");
        }
        let later = comm
            .all_reduce_sum(&mut buf)
            .expect_err("an aborted communicator");
        assert!(later.to_string().contains("aborted"), "{later}");
        println!("rank {}: failed after {elapsed:.1?}: {message}", env.rank);
        return;
    }
    let Some(place) = place(test, 2) else {
        return;
    };
    if !place.emulated() {
        eprintln!("{test}: skipped on GPUs: NCCL itself does not check that calls match");
        return;
    }
    let outcomes = run_ranks(test, &place, 2, &[0, 1], &[]);
    assert_ranks(test, &outcomes, &[]);
}

#[test]
fn a_killed_rank_fails_the_others_naming_it() {
    let test = "a_killed_rank_fails_the_others_naming_it";
    let timeout = Duration::from_secs(30);
    if let Some(env) = rank_env() {
        let (rt, mut comm) = join(&env, timeout);
        let mut buf = rt.upload(&inputs(env.rank, 1, 100)).unwrap();
        comm.all_reduce_sum(&mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        if env.rank == 2 {
            // SAFETY: kills this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let started = Instant::now();
        let err = comm
            .all_reduce_sum(&mut buf)
            .expect_err("an all-reduce without rank 2");
        let (elapsed, message) = (started.elapsed(), err.to_string());
        assert!(
            elapsed < timeout + Duration::from_secs(5),
            "{elapsed:?}: {message}"
        );
        if fake_device::emulated() {
            // Seen through its pid, not the emulator's 60 s timeout.
            assert!(elapsed < Duration::from_secs(15), "{elapsed:?}: {message}");
            for part in ["rank 2", "exited or was killed"] {
                assert!(message.contains(part), "no `{part}` in: {message}");
            }
        }
        println!("rank {}: failed after {elapsed:.1?}: {message}", env.rank);
        return;
    }
    let Some(place) = place(test, 3) else {
        return;
    };
    let outcomes = run_ranks(test, &place, 3, &[0, 1, 2], &[]);
    assert_ranks(test, &outcomes, &[2]);
}

#[test]
fn a_rank_that_stops_calling_times_the_others_out() {
    let test = "a_rank_that_stops_calling_times_the_others_out";
    if let Some(env) = rank_env() {
        // On the emulator its own 2 s timeout ends the wait inside the call; on GPUs the
        // communicator's.
        let timeout = if fake_device::emulated() { 30 } else { 3 };
        let (rt, mut comm) = join(&env, Duration::from_secs(timeout));
        let mut buf = rt.upload(&inputs(env.rank, 1, 100)).unwrap();
        if env.rank == 1 {
            std::thread::sleep(Duration::from_secs(6));
        }
        let started = Instant::now();
        let err = comm
            .all_reduce_sum(&mut buf)
            .expect_err("a timed-out all-reduce");
        let (elapsed, message) = (started.elapsed(), err.to_string());
        if env.rank == 0 {
            assert!(
                elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(5),
                "{elapsed:?}: {message}"
            );
            if fake_device::emulated() {
                for part in ["timed out after 2 s", "rank(s) 1"] {
                    assert!(message.contains(part), "no `{part}` in: {message}");
                }
            }
        } else if fake_device::emulated() {
            // Rank 0 gave up first: rank 1 learns why at once.
            assert!(elapsed < Duration::from_secs(1), "{elapsed:?}: {message}");
            assert!(message.contains("rank 0"), "{message}");
        }
        println!("rank {}: failed after {elapsed:.1?}: {message}", env.rank);
        return;
    }
    let Some(place) = place(test, 2) else {
        return;
    };
    let outcomes = run_ranks(test, &place, 2, &[0, 1], &[("RCX_NCCL_EMU_TIMEOUT_S", "2")]);
    assert_ranks(test, &outcomes, &[]);
}

#[test]
fn a_rank_that_never_arrives_fails_the_communicators_creation() {
    let test = "a_rank_that_never_arrives_fails_the_communicators_creation";
    if let Some(env) = rank_env() {
        let rt = Arc::new(CudaRuntime::new(env.rank).unwrap_or_else(|e| panic!("{e}")));
        let id = exchange_id(&env, false);
        let started = Instant::now();
        let err = Communicator::new(&rt, &id, env.rank, env.world, Duration::from_secs(3))
            .err()
            .expect("a communicator without rank 1");
        let (elapsed, message) = (started.elapsed(), err.to_string());
        assert!(
            elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(8),
            "{elapsed:?}: {message}"
        );
        for part in [
            "NCCL rank 0 of 2",
            "create the communicator",
            "never arrived",
        ] {
            assert!(message.contains(part), "no `{part}` in: {message}");
        }
        println!("rank {}: failed after {elapsed:.1?}: {message}", env.rank);
        return;
    }
    let Some(place) = place(test, 2) else {
        return;
    };
    let outcomes = run_ranks(test, &place, 2, &[0], &[]);
    assert_ranks(test, &outcomes, &[]);
}
