//! The figure builders, the PASS/MISS checks and the results.md writer on synthetic
//! scores and metrics (no training), and `rcx plot` / `rcx reproduce` argument handling.

use rcx::eval::{EvalReport, score_summaries, summarize};
use rcx::figures::{
    MetricsRecord, paper_figure, read_metrics, reward_histogram_panel, reward_panel,
    training_curves,
};
use rcx::loss::{LossSpec, PromptType, Utility};
use rcx::plot::Series;
use rcx::report::{
    Architecture, Reproduction, RunResult, checks, dead_model_note, figure_files, results_markdown,
};
use rcx::scoring::PromptScores;
use std::path::PathBuf;
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("report-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A prompt whose rewards are `ascending` (index 1 = worst) plus `shift`, stored best first
/// as the data is.
fn prompt(ty: PromptType, ascending: &[f64], shift: f64) -> PromptScores {
    PromptScores {
        prompt_type: Some(ty),
        rewards: ascending
            .iter()
            .rev()
            .map(|r| (r + shift).clamp(0.0, 1.0))
            .collect(),
    }
}

/// Open prompts at `open` and closed ones at `closed`, a few of each, with a small spread
/// (symmetric, so that the means are exactly the given curves).
fn scores(open: &[f64], closed: &[f64]) -> Vec<PromptScores> {
    let mut out = Vec::new();
    for shift in [-0.002, 0.0, 0.002] {
        out.push(prompt(PromptType::Open, open, shift));
        out.push(prompt(PromptType::Closed, closed, shift));
    }
    out
}

fn optimum(name: &str, eps: f64) -> Vec<f64> {
    rcx::theory::solve(&Utility::parse(name).unwrap(), eps, 8).unwrap()
}

fn metrics(report: &EvalReport, steps: &[usize]) -> Vec<MetricsRecord> {
    steps
        .iter()
        .map(|&step| MetricsRecord {
            step,
            train_loss: -1.0,
            learning_rate: 1e-3,
            eval_loss: -1.0 - step as f64 / 1000.0,
            elapsed_s: step as f64,
            report: report.clone(),
        })
        .collect()
}

fn run(name: &str, loss: &str, s: Vec<PromptScores>) -> RunResult {
    let spec = LossSpec::parse(loss).unwrap();
    let on_eval = score_summaries(s.clone(), Some(&spec), 0.1).unwrap();
    let on_train = score_summaries(s, Some(&spec), 0.1).unwrap();
    let metrics = metrics(&on_eval.report, &[100, 200]);
    RunResult {
        name: name.into(),
        loss: loss.into(),
        model: "bert-tiny".into(),
        steps: 200,
        learning_rate: 1e-3,
        eps: 0.1,
        prompts_per_step: 4,
        train_prompts: 400,
        architecture: Architecture {
            layers: 2,
            hidden: 128,
            heads: 2,
            parameters: 4_400_000,
        },
        provenance: None,
        train_wall_s: 90.0,
        eval_wall_s: 3.0,
        reused: false,
        on_train,
        on_eval,
        metrics,
    }
}

/// An adaptive run exactly at its optimum: open on x_inv's, closed on the step.
fn adaptive_run() -> RunResult {
    run(
        "x_adaptive",
        "adaptive",
        scores(&optimum("x_inv", 0.1), &optimum("x", 0.1)),
    )
}

fn count(svg: &str, needle: &str) -> usize {
    svg.matches(needle).count()
}

#[test]
fn metrics_lines_read_back_and_bad_lines_name_file_and_line() {
    let dir = scratch("metrics");
    let report = adaptive_run().on_eval.report;
    // The shape rcx train writes: the step fields with the report flattened beside them.
    let mut line = serde_json::to_value(&report).unwrap();
    let fields = line.as_object_mut().unwrap();
    fields.insert("step".into(), serde_json::json!(200));
    for (key, value) in [
        ("train_loss", -2.0),
        ("learning_rate", 1e-4),
        ("eval_loss", -3.0),
        ("elapsed_s", 12.5),
    ] {
        fields.insert(key.into(), serde_json::json!(value));
    }
    let path = dir.join("metrics.jsonl");
    std::fs::write(&path, format!("{line}\n")).unwrap();
    let records = read_metrics(&path).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].step, 200);
    assert_eq!(records[0].elapsed_s, 12.5);
    assert_eq!(records[0].report.collapse_gap, report.collapse_gap);
    assert_eq!(records[0].report.by_type[1].prompt_type, "closed");

    std::fs::write(&path, format!("{line}\n{{\"step\": 1}}\n")).unwrap();
    let err = read_metrics(&path).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl:2:"), "{err}");
}

#[test]
fn reward_panel_draws_bands_means_and_one_optimum_per_utility() {
    let adaptive = adaptive_run().on_eval.report;
    let figure = paper_figure(None, &[("adaptive".into(), &adaptive)]);
    let svg = figure.to_svg();
    assert_eq!(count(&svg, "class=\"band\""), 2);
    // Two mean lines and, the types having different utilities, two dashed optima.
    assert_eq!(count(&svg, "class=\"line\""), 4);
    let dashed_paths = svg
        .lines()
        .filter(|l| l.contains("class=\"line\"") && l.contains("stroke-dasharray"))
        .count();
    assert_eq!(dashed_paths, 2);
    assert!(svg.contains("open optimum x_inv") && svg.contains("closed optimum x"));

    // The open mean at index 2 is drawn where the frame maps it.
    let open_mean = adaptive.for_type("open").unwrap().ranks[1].mean;
    let (px, py) = figure.frame(0).unwrap().to_px(2.0, open_mean);
    assert!(
        svg.contains(&format!("L{px:.2},{py:.2}")),
        "no point at ({px:.2},{py:.2})"
    );

    // A single utility shares one optimum: one dashed line, in the optimum's colour.
    let single = summarize(
        &scores(&optimum("log", 0.1), &optimum("log", 0.1)),
        Some((&LossSpec::parse("log").unwrap(), 0.1)),
    )
    .unwrap();
    let panel = reward_panel("log", &single);
    let dashed: Vec<_> = panel
        .series
        .iter()
        .filter(|s| matches!(s, Series::Line(l) if l.dashed))
        .collect();
    assert_eq!(dashed.len(), 1);
    let Series::Line(line) = dashed[0] else {
        unreachable!()
    };
    assert_eq!(line.ys, optimum("log", 0.1));
    assert_eq!(line.xs, (1..=8).map(f64::from).collect::<Vec<_>>());
}

#[test]
fn paper_figure_puts_runs_side_by_side_titled() {
    let a = adaptive_run().on_eval.report;
    let figure = paper_figure(
        Some("all"),
        &[
            ("U = x".into(), &a),
            ("U = log x".into(), &a),
            ("U = -1/x".into(), &a),
        ],
    );
    assert_eq!(figure.panels.len(), 3);
    let svg = figure.to_svg();
    assert_eq!(count(&svg, "<g class=\"panel\">"), 3);
    for title in ["U = x", "U = log x", "U = -1/x"] {
        assert!(svg.contains(&format!(">{title}</text>")), "{title}");
    }
    // Panels do not overlap: each frame starts right of the previous one's end.
    let (f0, f1) = (figure.frame(0).unwrap(), figure.frame(1).unwrap());
    assert!(f1.left > f0.left + f0.width);
}

#[test]
fn histograms_are_densities_per_prompt_type() {
    let s = scores(&optimum("x_inv", 0.1), &optimum("x", 0.1));
    let panel = reward_histogram_panel("h", &s, 20);
    let hists: Vec<_> = panel
        .series
        .iter()
        .filter_map(|s| match s {
            Series::Histogram(h) => Some(h),
            _ => None,
        })
        .collect();
    assert_eq!(hists.len(), 2);
    for h in &hists {
        let area: f64 = h
            .edges
            .windows(2)
            .zip(&h.heights)
            .map(|(e, h)| (e[1] - e[0]) * h)
            .sum();
        assert!((area - 1.0).abs() < 1e-9, "area {area}");
    }
    // The closed step puts all its mass in the two end bins.
    let closed = hists[1];
    let ends = (closed.heights[0] + closed.heights[19]) * 0.05;
    assert!((ends - 1.0).abs() < 1e-9, "{ends}");
    assert!(hists[0].label.as_deref().unwrap().contains("24 rewards"));
}

#[test]
fn training_curves_have_loss_accuracy_and_gap_panels() {
    let a = adaptive_run();
    let one = training_curves(&[("x_adaptive".into(), a.metrics.clone())]);
    assert_eq!(one.panels.len(), 3);
    // One run: all, open, closed and closed long-vs-short.
    assert_eq!(one.panels[1].series.len(), 4);
    let Series::Line(gap) = &one.panels[2].series[0] else {
        panic!()
    };
    assert_eq!(gap.xs, vec![100.0, 200.0]);
    assert_eq!(gap.ys[0], a.on_eval.report.collapse_gap.unwrap());

    // Several runs: one line per run in each panel; a run without both types has no gap.
    let mut untyped = a.metrics.clone();
    for m in &mut untyped {
        m.report.collapse_gap = None;
    }
    let many = training_curves(&[("a".into(), a.metrics.clone()), ("b".into(), untyped)]);
    assert!(many.panels.iter().all(|p| p.series.len() == 2));
    let Series::Line(gap_b) = &many.panels[2].series[1] else {
        panic!()
    };
    assert!(gap_b.ys.iter().all(|v| v.is_nan()));
    assert!(many.to_svg().ends_with("</svg>\n"));
}

#[test]
fn checks_pass_at_the_optimum_and_miss_away_from_it() {
    let good = checks(&adaptive_run());
    // Per split: the gap and the two curves.
    assert_eq!(good.len(), 6);
    assert!(
        good.iter().all(|c| c.pass),
        "{:?}",
        good.iter().map(|c| &c.what).collect::<Vec<_>>()
    );
    assert!(
        good.iter()
            .any(|c| c.what.contains("separate") && c.measured >= 0.15)
    );

    // U = x with both types on the step: the types coincide; the pure optimum is the same.
    let x = run("x", "x", scores(&optimum("x", 0.1), &optimum("x", 0.1)));
    let c = checks(&x);
    assert!(c.iter().all(|c| c.pass));
    assert!(
        c.iter()
            .any(|c| c.what.contains("coincide") && c.measured == 0.0)
    );

    // x_inv with the closed curve 0.05 above the open one: the gap and that curve miss.
    let open = optimum("x_inv", 0.1);
    let closed: Vec<f64> = open.iter().map(|r| r + 0.05).collect();
    let shifted = run("x_inv", "x_inv", scores(&open, &closed));
    let c = checks(&shifted);
    let gap = c
        .iter()
        .find(|c| c.split == "eval" && c.what.contains("gap"))
        .unwrap();
    assert!(!gap.pass);
    assert!((gap.measured - 0.05).abs() < 0.01, "{}", gap.measured);
    let closed_check = c
        .iter()
        .find(|c| c.split == "eval" && c.what.starts_with("closed"))
        .unwrap();
    assert!(!closed_check.pass && closed_check.note.contains("pure form"));
    let open_check = c
        .iter()
        .find(|c| c.split == "eval" && c.what.starts_with("open"))
        .unwrap();
    assert!(open_check.pass);
}

#[test]
fn results_markdown_holds_targets_tables_theory_and_figure_links() {
    let open = optimum("x_inv", 0.1);
    let closed: Vec<f64> = open.iter().map(|r| r + 0.05).collect();
    let mut logsigmoid = run("logsigmoid", "logsigmoid", scores(&open, &closed));
    logsigmoid.metrics = metrics(&logsigmoid.on_eval.report, &[100, 200, 300]);
    let r = Reproduction {
        runs: vec![adaptive_run(), logsigmoid],
        skipped: vec![("minilm_x_adaptive".into(), "--skip-minilm was given".into())],
        total_wall_s: 600.0,
        machine: "a test".into(),
        figures_dir: "figures".into(),
        command: "rcx reproduce".into(),
    };
    let md = results_markdown(&r);
    assert!(md.contains("Made by `rcx reproduce`."));
    assert!(md.contains("Total wall time: **10.0 min**; a test."));
    assert!(md.contains("Skipped `minilm_x_adaptive`: --skip-minilm was given"));
    // PASS rows for the adaptive run, MISS rows for the shifted one, with their details.
    assert!(md.contains("| x_adaptive | eval | types separate: collapse gap |"));
    assert!(
        md.lines()
            .any(|l| l.starts_with("| logsigmoid | train | types coincide")
                && l.contains("| MISS |"))
    );
    assert!(md.contains("of the checks miss"));
    assert!(md.contains("`logsigmoid` on eval prompts, types coincide"));
    // The log-sigmoid gap at every evaluation.
    for step in [100, 200, 300] {
        let gap = r.runs[1].metrics[0].report.collapse_gap.unwrap();
        assert!(
            md.contains(&format!("\n| {step} | {gap:.4} |")),
            "step {step}"
        );
    }
    // The theory's pure x_inv optimum (the paper's dashed line) beside the eps = 0.1 one.
    let pure = optimum("x_inv", 0.0);
    assert!((pure[1] - 0.121).abs() < 1e-3);
    assert!(md.contains(&format!(
        "| 2 | {:.3} | {:.3} | {:.3} |",
        pure[1], open[1], open[1]
    )));
    for link in [
        "figures/paper_figure_eval.svg",
        "figures/paper_figure_train.svg",
        "figures/x_adaptive_panels.svg",
        "figures/logsigmoid_curves.svg",
        "figures/collapse_gap_by_step.svg",
    ] {
        assert!(md.contains(&format!("({link})")), "{link}");
    }
    // Every linked figure is one that figure_files writes.
    let files: Vec<String> = figure_files(&r.runs).into_iter().map(|(f, _)| f).collect();
    for link in md.split("](figures/").skip(1) {
        let name = &link[..link.find(')').unwrap()];
        assert!(files.iter().any(|f| f == name), "{name} not written");
    }
}

#[test]
fn figure_files_are_well_formed_svg() {
    let runs = vec![
        adaptive_run(),
        run("x", "x", scores(&optimum("x", 0.1), &optimum("x", 0.1))),
    ];
    let files = figure_files(&runs);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"paper_figure_eval.svg") && names.contains(&"x_curves.svg"));
    for (name, figure) in &files {
        let svg = figure.to_svg();
        assert!(
            svg.starts_with("<svg") && svg.ends_with("</svg>\n"),
            "{name}"
        );
        assert_eq!(
            count(&svg, "<g class=\"panel\">"),
            figure.panels.len(),
            "{name}"
        );
        assert!(!svg.contains("NaN"), "{name}");
    }
}

#[test]
fn plot_command_draws_runs_from_metrics_and_reports_bad_input() {
    let dir = scratch("plot-cli");
    let report = adaptive_run().on_eval.report;
    for name in ["a", "b"] {
        let run = dir.join(name);
        std::fs::create_dir_all(&run).unwrap();
        let mut line = serde_json::to_value(&report).unwrap();
        let fields = line.as_object_mut().unwrap();
        for key in [
            "step",
            "train_loss",
            "learning_rate",
            "eval_loss",
            "elapsed_s",
        ] {
            fields.insert(key.into(), serde_json::json!(1));
        }
        std::fs::write(run.join("metrics.jsonl"), format!("{line}\n")).unwrap();
    }
    let out = dir.join("fig.svg");
    let status = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args([
            "plot",
            dir.join("a").to_str().unwrap(),
            dir.join("b").to_str().unwrap(),
        ])
        .args(["--out", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let svg = std::fs::read_to_string(&out).unwrap();
    assert_eq!(count(&svg, "<g class=\"panel\">"), 2);

    let missing = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["plot", dir.join("nope").to_str().unwrap(), "--out"])
        .arg(dir.join("x.svg"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("metrics.jsonl"));

    let bad = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["reproduce", "--only", "x,bogus", "--out"])
        .arg(dir.join("r.md"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown run `bogus`"), "{err}");
    assert!(!dir.join("r.md").exists());
}

#[test]
fn a_model_with_one_reward_for_everything_is_reported_with_its_last_healthy_step() {
    let constant = [0.0004; 8];
    let mut dead = run("x", "x", scores(&constant, &constant));
    // The constant rewards tie every pair; with the spread of `scores` they would not.
    for scored in [&mut dead.on_eval, &mut dead.on_train] {
        for p in &mut scored.scores {
            p.rewards = vec![0.0004; 8];
        }
        let spec = LossSpec::parse("x").unwrap();
        *scored = score_summaries(scored.scores.clone(), Some(&spec), 0.1).unwrap();
    }
    let healthy = adaptive_run().on_eval.report;
    dead.metrics = vec![
        metrics(&healthy, &[100]).remove(0),
        metrics(&dead.on_eval.report, &[200]).remove(0),
        metrics(&dead.on_eval.report, &[300]).remove(0),
    ];
    let note = dead_model_note(&dead).expect("a dead model is noted");
    assert!(note.contains("same reward (0.0004)"), "{note}");
    assert!(
        note.contains("step 200 and lasts to the end (step 300)"),
        "{note}"
    );
    assert!(
        note.contains("At step 100 the model still ranked"),
        "{note}"
    );
    // The gap passes vacuously, the curves miss; the markdown carries the note.
    let c = checks(&dead);
    assert!(c.iter().any(|c| c.what.contains("gap") && c.pass));
    assert!(
        c.iter()
            .filter(|c| c.what.contains("curve"))
            .all(|c| !c.pass)
    );
    let md = results_markdown(&Reproduction {
        runs: vec![dead],
        skipped: vec![],
        total_wall_s: 1.0,
        machine: "m".into(),
        figures_dir: "figures".into(),
        command: "rcx reproduce".into(),
    });
    assert!(md.contains(&note));
    assert!(dead_model_note(&adaptive_run()).is_none());
}

#[test]
fn run_titles_are_losses_and_shared_ones_name_their_folder() {
    let dir = scratch("titles");
    let mut dirs = Vec::new();
    for (name, loss) in [
        ("x", "x"),
        ("x_lr1e-3", "x"),
        ("x_adaptive", "adaptive"),
        ("bare", ""),
    ] {
        let run = dir.join(name);
        std::fs::create_dir_all(&run).unwrap();
        if !loss.is_empty() {
            let meta = format!("{{\"max_length\": 160, \"loss\": \"{loss}\", \"eps\": 0.1}}");
            std::fs::write(run.join("rcx.json"), meta).unwrap();
        }
        dirs.push(run);
    }
    assert_eq!(
        rcx::figures::run_titles(&dirs),
        vec![
            "U = x (x)",
            "U = x (x_lr1e-3)",
            "prompt-aware (open -1/x, closed x)",
            "bare"
        ]
    );
}

mod common;

/// A 4-step bert-tiny run on the length ranking, saving at steps 2 and 4, with
/// `overrides` replacing or adding keys.
fn tiny_run(dir: &std::path::Path, name: &str, overrides: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let base = [
        ("per_device_train_batch_size", "4"),
        ("max_length", "48"),
        ("max_steps", "4"),
        ("eval_steps", "2"),
        ("save_steps", "2"),
        ("seed", "1"),
    ];
    common::write_config(dir, name, &base, overrides)
}

fn train_ok(config: &std::path::Path) {
    let out = common::rcx_train(config, &[]);
    assert!(
        out.status.success(),
        "rcx train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The commit the test binary's crate was built from: HEAD of the checkout when this
/// crate is the top of one, else none.
fn checkout_commit() -> Option<String> {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(manifest)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let same = std::fs::canonicalize(top).ok()? == std::fs::canonicalize(manifest).ok()?;
    same.then(|| git(&["rev-parse", "HEAD"])).flatten()
}

fn provenance_of(folder: &std::path::Path) -> serde_json::Value {
    let path = folder.join("rcx.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["provenance"].clone()
}

#[test]
fn every_model_folder_records_version_commit_config_and_data_hashes() {
    let dir = scratch("provenance");
    let (config, out) = tiny_run(&dir, "run", &[]);
    train_ok(&config);
    let expected_data = serde_json::json!([
        {"role": "train", "path": common::fixture("lengths.jsonl").display().to_string(),
         "sha256": sha256_of(&common::fixture("lengths.jsonl"))},
        {"role": "eval", "path": common::fixture("lengths_eval.jsonl").display().to_string(),
         "sha256": sha256_of(&common::fixture("lengths_eval.jsonl"))},
    ]);
    let commit = checkout_commit();
    eprintln!("built from commit {commit:?}");
    for folder in [
        out.clone(),
        out.join("checkpoint-2"),
        out.join("checkpoint-4"),
    ] {
        let p = provenance_of(&folder);
        assert_eq!(p["rcx_version"], env!("CARGO_PKG_VERSION"), "{folder:?}");
        assert_eq!(p["config_sha256"], sha256_of(&config), "{folder:?}");
        assert_eq!(p["data"], expected_data, "{folder:?}");
        assert_eq!(p["git_commit"], serde_json::json!(commit), "{folder:?}");
    }
    // A folder written before provenance existed still loads, without it.
    let meta = r#"{"max_length": 48, "loss": "x_inv", "eps": 0.1}"#;
    std::fs::write(out.join("rcx.json"), meta).unwrap();
    let (_, _, meta) = rcx::checkpoint::load_for_scoring(&out).unwrap();
    assert_eq!(meta.expect("rcx.json is read").max_length, 48);
}

/// `rcx reproduce --reuse --only x` on a run folder `dir/x` made from `dir/x.yml`.
fn reproduce_reuse(dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["reproduce", "--reuse", "--only", "x", "--skip-minilm"])
        .arg("--configs")
        .arg(dir)
        .arg("--runs")
        .arg(dir)
        .arg("--out")
        .arg(dir.join("results.md"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn reuse_takes_only_a_run_whose_record_matches_the_config_and_data() {
    let dir = scratch("reuse");
    // The run evaluates on a copy of the fixture, to be edited below.
    let eval = dir.join("eval.jsonl");
    std::fs::copy(common::fixture("lengths_eval.jsonl"), &eval).unwrap();
    let eval_datasets = format!("[{}]", eval.display());
    let (config, out) = tiny_run(&dir, "x", &[("eval_datasets", &eval_datasets)]);
    train_ok(&config);
    let stderr = reproduce_reuse(&dir);
    assert!(stderr.contains("x: reusing"), "{stderr}");

    // The config changed (a comment is enough: the record is of the file's bytes).
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("# edited\n");
    std::fs::write(&config, text).unwrap();
    let stderr = reproduce_reuse(&dir);
    assert!(
        stderr.contains("x: not reusing") && stderr.contains("config_sha256 differs"),
        "{stderr}"
    );
    assert!(stderr.contains("x: training 4 steps"), "{stderr}");
    // Trained again, the run now matches and is reused.
    assert!(reproduce_reuse(&dir).contains("x: reusing"));

    // The same config, its eval file edited in place: trained again.
    let mut data = std::fs::read_to_string(&eval).unwrap();
    let first = data.lines().next().unwrap().to_string();
    data.push_str(&format!("{first}\n"));
    std::fs::write(&eval, data).unwrap();
    let stderr = reproduce_reuse(&dir);
    assert!(
        stderr.contains("x: not reusing") && stderr.contains("evaluation file"),
        "{stderr}"
    );
    assert!(stderr.contains("x: training 4 steps"), "{stderr}");

    // A folder without provenance (written before rcx recorded it) is not reused.
    let meta = r#"{"max_length": 48, "loss": "x_inv", "eps": 0.1}"#;
    std::fs::write(out.join("rcx.json"), meta).unwrap();
    let stderr = reproduce_reuse(&dir);
    assert!(
        stderr.contains("x: not reusing") && stderr.contains("no provenance"),
        "{stderr}"
    );
}

/// results.md's prose says what the runs were, from the runs: sizes, steps, rates, eps,
/// times and the provenance of each, never the numbers of an earlier reproduction.
#[test]
fn results_prose_is_computed_from_the_runs() {
    let open = optimum("x_inv", 0.2);
    let closed = optimum("x", 0.2);
    let mut main = run("x_adaptive", "adaptive", scores(&open, &closed));
    main.steps = 123;
    main.eps = 0.2;
    main.learning_rate = 2e-4;
    main.prompts_per_step = 6;
    main.train_prompts = 246;
    main.train_wall_s = 150.0;
    main.architecture = Architecture {
        layers: 3,
        hidden: 96,
        heads: 4,
        parameters: 3_210_000,
    };
    main.provenance = Some(rcx::provenance::Provenance {
        rcx_version: "9.9.9".into(),
        git_commit: Some("0123456789abcdef0123".into()),
        config_sha256: "fedcba9876543210fedc".into(),
        data: vec![],
    });
    let mut x = run("x", "x", scores(&closed, &closed));
    x.train_wall_s = 30.0;
    let r = Reproduction {
        runs: vec![main, x],
        skipped: vec![],
        total_wall_s: 200.0,
        machine: "a test".into(),
        figures_dir: "figures".into(),
        command: "rcx reproduce".into(),
    };
    let md = results_markdown(&r);
    let prose = &md[..md.find("## Targets").unwrap()];
    for expected in [
        "It trains `x_adaptive` and `x`,",
        "n = 8",
        "`x_adaptive` trains `bert-tiny` (3 layers, hidden 96, 4 heads, 3.2M parameters) from \
         scratch for 123 steps of 6 prompts (about 3.0 passes over its 246 training prompts), which took 2.5 min",
        "`x` trains `bert-tiny` (2 layers, hidden 128, 2 heads, 4.4M parameters) from scratch \
         for 200 steps of 4 prompts (about 2.0 passes over its 400 training prompts), which took 0.5 min",
        "Learning rates: 2e-4 (x_adaptive); 1e-3 (x).",
        "The shift eps: 0.2 (x_adaptive); 0.1 (x).",
        "shifted by the run's eps: 0.2 (x_adaptive); 0.1 (x)",
    ] {
        assert!(
            prose.contains(expected),
            "missing {expected:?} in:\n{prose}"
        );
    }
    let last = r.runs[0].metrics.last().unwrap();
    let open_acc = last.report.for_type("open").unwrap().pairwise_accuracy;
    assert!(
        prose.contains(&format!(
            "`x_adaptive`, ends (step {}) with open-ended pairwise accuracy {open_acc:.4}",
            last.step
        )),
        "{prose}"
    );
    // Nothing of the earlier reproduction's fixed text survives.
    for stale in [
        "800",
        "1,696",
        "1.9 passes",
        "60 minutes",
        "2 to 4 minutes",
        "eps = 0.1",
    ] {
        assert!(!prose.contains(stale), "fixed text {stale:?} in:\n{prose}");
    }
    assert!(!md.contains("(eps 0.1 / pure)") && !md.contains("(eps 0.1) dashed"));
    // The per-run table: settings and the recorded config hash and commit.
    assert!(md.contains(
        "| x_adaptive | `adaptive` (prompt-aware (open -1/x, closed x)) | bert-tiny | 3 layers, \
         hidden 96, 4 heads, 3.2M parameters | 123 | 6 | 3.0 | 2e-4 | 0.2 | 2.5 min | 3 s | \
         `fedcba987654` | `0123456789ab` |"
    ), "{md}");
    assert!(md.contains("| 3 s | - | - |"), "{md}");
}
