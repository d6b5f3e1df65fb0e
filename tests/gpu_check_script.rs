//! scripts/gpu-check.sh gets one shot on a lent GPU: its flow (driver check first, one
//! archive and a summary, a test per process, sanitizer skips, the data-parallel part on 1
//! and 2 GPUs, budget, signals) is checked here without a GPU by
//! scripts/gpu-check-selftest.sh, over fake executables, drivers and libraries (about 90 s).

use std::process::Command;

#[test]
fn gpu_check_script_survives_every_scenario_of_its_selftest() {
    let python = Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|o| o.status.success()) {
        eprintln!("gpu_check_script: skipped, the selftest's fakes need python3 (not found)");
        return;
    }
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/gpu-check-selftest.sh"
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gpu-check-selftest.sh failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL:"), "{stdout}");
}
