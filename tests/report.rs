//! The figure builders, the PASS/MISS checks and the results.md writer on synthetic
//! scores and metrics (no training), and `rcx plot` / `rcx reproduce` argument handling.

use rcx::eval::{EvalReport, score_summaries, summarize};
use rcx::figures::{
    MetricsRecord, paper_figure, read_metrics, reward_histogram_panel, reward_panel,
    training_curves,
};
use rcx::loss::{LossSpec, PromptType, Utility};
use rcx::plot::Series;
use rcx::report::backbones::{self, backbones_markdown};
use rcx::report::document::{TITLE, compose, parse_sections};
use rcx::report::{
    Architecture, BACKBONE_RUNS, EXTRA_RUNS, MINILM_RUN, PAPER_RUNS, Reproduction, RunResult,
    SECTIONS, checks, dead_model_note, figure_files, paper_runs_markdown,
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
            kv_heads: None,
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
fn paper_runs_markdown_holds_targets_tables_theory_and_figure_links() {
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
    let md = paper_runs_markdown(&r);
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
    let md = paper_runs_markdown(&Reproduction {
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
        kv_heads: None,
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
    let md = paper_runs_markdown(&r);
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

/// A reproduction of `runs` made by `command`.
fn reproduction(runs: Vec<RunResult>, command: &str) -> Reproduction {
    Reproduction {
        runs,
        skipped: vec![],
        total_wall_s: 60.0,
        machine: "a test".into(),
        figures_dir: "figures".into(),
        command: command.into(),
    }
}

/// The text between a section's markers in a results file, found without the parser under
/// test.
fn section_text<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    let begin = format!("<!-- rcx reproduce: section {key} ");
    let start = doc.find(&begin)?;
    let start = start + doc[start..].find('\n')? + 1;
    let end = doc.find(&format!("<!-- rcx reproduce: end of section {key} -->"))?;
    Some(&doc[start..end])
}

/// A run of the backbones' section on `model`.
fn backbone_run(name: &str, model: &str, loss: &str, s: Vec<PromptScores>) -> RunResult {
    let mut r = run(name, loss, s);
    r.model = model.into();
    r.architecture.kv_heads = Some(1);
    r
}

fn backbone_runs() -> Vec<RunResult> {
    let step = optimum("x", 0.1);
    let inv = optimum("x_inv", 0.1);
    let above: Vec<f64> = inv.iter().map(|r| r + 0.05).collect();
    vec![
        backbone_run("llama_x", "llama-tiny", "x", scores(&step, &step)),
        backbone_run(
            "llama_x_adaptive",
            "llama-tiny",
            "adaptive",
            scores(&inv, &step),
        ),
        backbone_run(
            "deberta_x",
            "deberta-v3-tiny",
            "x_inv",
            scores(&inv, &above),
        ),
        backbone_run(
            "deberta_x_adaptive",
            "deberta-v3-tiny",
            "adaptive",
            scores(&inv, &inv),
        ),
    ]
}

#[test]
fn every_run_belongs_to_exactly_one_section() {
    let mut bert: Vec<&str> = PAPER_RUNS.to_vec();
    bert.push(MINILM_RUN);
    bert.extend(EXTRA_RUNS);
    assert_eq!(SECTIONS[0].runs, &bert[..]);
    assert_eq!(SECTIONS[1].runs, &BACKBONE_RUNS[..]);
    let all: Vec<&str> = SECTIONS
        .iter()
        .flat_map(|s| s.runs.iter().copied())
        .collect();
    for name in &all {
        assert_eq!(all.iter().filter(|n| *n == name).count(), 1, "{name}");
    }
}

#[test]
fn a_rewritten_section_leaves_the_others_byte_for_byte() {
    let path = PathBuf::from("docs/results.md");
    let bert = paper_runs_markdown(&reproduction(
        vec![adaptive_run()],
        "rcx reproduce --only x_adaptive",
    ));
    let mut runs = backbone_runs();
    let old = backbones_markdown(&reproduction(
        runs.drain(..2).collect(),
        "rcx reproduce --only llama_x,llama_x_adaptive",
    ));
    let doc = compose(
        &SECTIONS,
        &[("bert", bert.clone()), ("backbones", old.clone())],
        &[],
    );
    assert!(doc.starts_with(&format!("{TITLE}\n\n")), "{doc}");
    assert!(
        doc.contains("made by `rcx reproduce --only x_adaptive`."),
        "{doc}"
    );
    assert!(doc.contains("made by `rcx reproduce --only llama_x,llama_x_adaptive`."));
    assert_eq!(section_text(&doc, "bert"), Some(bert.as_str()));
    let kept = parse_sections(&path, &doc, &SECTIONS).unwrap();
    assert_eq!(
        kept,
        vec![("bert", bert.clone()), ("backbones", old.clone())]
    );

    // The backbones' section made again from other runs: BERT's is the same bytes, marker
    // lines included.
    let new = backbones_markdown(&reproduction(runs, "rcx reproduce --only deberta_x"));
    assert_ne!(new, old);
    let again = compose(&SECTIONS, &[("backbones", new.clone())], &kept);
    assert_eq!(section_text(&again, "backbones"), Some(new.as_str()));
    let whole_bert = |d: &str| {
        let start = d.find("<!-- rcx reproduce: section bert ").unwrap();
        let end = d
            .find("<!-- rcx reproduce: end of section bert -->")
            .unwrap();
        d[start..end].to_string()
    };
    assert_eq!(whole_bert(&again), whole_bert(&doc));
    assert!(again.contains("made by `rcx reproduce --only deberta_x`."));
    assert!(!again.contains("llama_x_adaptive`."), "{again}");
    // Composed again from what it holds, the file is the same.
    let reread = parse_sections(&path, &again, &SECTIONS).unwrap();
    assert_eq!(compose(&SECTIONS, &[], &reread), again);

    // A file from before sections: all of it after the title is BERT's section, kept.
    let legacy = format!("{TITLE}\n\n{bert}");
    let kept = parse_sections(&path, &legacy, &SECTIONS).unwrap();
    assert_eq!(kept, vec![("bert", bert.clone())]);
    let migrated = compose(&SECTIONS, &[("backbones", new)], &kept);
    assert_eq!(section_text(&migrated, "bert"), Some(bert.as_str()));

    // A section never made is named in the head with the command that makes it.
    let only_bert = compose(&SECTIONS, &[("bert", bert)], &[]);
    assert!(only_bert.contains(
        "not made yet (`rcx reproduce --only \
         llama_x,llama_x_inv,llama_x_adaptive,deberta_x,deberta_x_adaptive` makes it)"
    ));
    assert!(section_text(&only_bert, "backbones").is_none());
}

#[test]
fn a_results_file_whose_sections_cannot_be_kept_is_an_error_naming_the_line() {
    let path = PathBuf::from("docs/results.md");
    let bert = "Made by `rcx reproduce`.\n\nrows\n";
    let good = compose(&SECTIONS, &[("bert", bert.into())], &[]);
    let line_of = |d: &str, needle: &str| d[..d.find(needle).unwrap()].matches('\n').count() + 1;
    let begin = line_of(&good, "<!-- rcx reproduce: section bert");
    let cases = [
        ("# My notes\n\ntext\n".to_string(), 1, "not a results file"),
        (
            good.replace("<!-- rcx reproduce: end of section bert -->\n", ""),
            begin,
            "no end marker",
        ),
        (
            good.replace("section bert (", "section bogus ("),
            begin,
            "unknown marker",
        ),
        (
            format!("{good}{}", &good[good.find("<!-- rcx").unwrap()..]),
            good.lines().count() + 1,
            "appears twice",
        ),
        (
            good.replace(
                "rows\n",
                "rows\n<!-- rcx reproduce: section backbones x -->\n",
            ),
            begin + 4,
            "a marker inside section bert",
        ),
    ];
    for (text, line, what) in cases {
        let err = parse_sections(&path, &text, &SECTIONS)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("docs/results.md:{line}: ")) && err.contains(what),
            "{what}: {err}\n{text}"
        );
    }
}

#[test]
fn the_backbones_section_answers_per_backbone_from_the_gaps() {
    let mut runs = backbone_runs();
    // A decoder run whose model gives every completion one reward: not evidence of collapse.
    let constant = [0.0004; 8];
    let mut dead = backbone_run(
        "llama_x_inv",
        "llama-tiny",
        "x_inv",
        scores(&constant, &constant),
    );
    for scored in [&mut dead.on_eval, &mut dead.on_train] {
        for p in &mut scored.scores {
            p.rewards = vec![0.0004; 8];
        }
        let spec = LossSpec::parse("x_inv").unwrap();
        *scored = score_summaries(scored.scores.clone(), Some(&spec), 0.1).unwrap();
    }
    dead.metrics = metrics(&dead.on_eval.report, &[100, 200]);
    runs.insert(1, dead);
    let md = backbones_markdown(&reproduction(runs, "rcx reproduce --only llama_x"));
    assert!(md.starts_with(&format!("## {}\n\n", backbones::TITLE)));
    assert!(md.contains("Made by `rcx reproduce --only llama_x`."));
    for expected in [
        "- `llama-tiny`: with one utility for every prompt the two prompt types get the same \
         curve (collapse) in `llama_x`; `llama_x_inv` is not read as collapse (llama_x_inv: one \
         reward for everything (see the note under Targets)); with the prompt-aware loss the \
         types separate in `llama_x_adaptive`: the prompt-aware loss separates the types; not \
         every single-utility run collapses here.",
        "- `deberta-v3-tiny`: `deberta_x` is not read as collapse (deberta_x: between the \
         bounds); with the prompt-aware loss `deberta_x_adaptive` does not separate them \
         (deberta_x_adaptive: types coincide: collapse): this backbone does not show the \
         paper's picture in these runs.",
        "| llama-tiny | llama_x | U = x | 0.0000 | 0.0000 |",
        "2 layers, hidden 128, 2 heads (1 key/value), 4.4M parameters",
        "`llama_x_inv`: the final model gives every completion of every prompt the same reward",
        "| step | llama_x | llama_x_inv | llama_x_adaptive | deberta_x | deberta_x_adaptive |",
    ] {
        assert!(md.contains(expected), "missing {expected:?} in:\n{md}");
    }
    // The deberta_x gap (about 0.05: its closed curve is 0.05 above, short of 1) at each
    // evaluation, in its column.
    let deberta_gap = backbone_runs()[2].metrics[1].report.collapse_gap.unwrap();
    assert!((deberta_gap - 0.05).abs() < 0.01, "{deberta_gap}");
    let row = md
        .lines()
        .find(|l| l.starts_with("| 200 |"))
        .expect("the step-200 row");
    assert_eq!(
        row.split(" | ").nth(4),
        Some(format!("{deberta_gap:.4}").as_str()),
        "{row}"
    );
    // Only the section's figures are linked, and each is one its figure_files writes.
    let runs = backbone_runs();
    let files: Vec<String> = backbones::figure_files(&runs)
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert!(files.contains(&"backbones_figure_eval.svg".to_string()));
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("paper_figure") || f == "collapse_gap_by_step.svg")
    );
    let md = backbones_markdown(&reproduction(runs, "rcx reproduce"));
    let links: Vec<&str> = md
        .split("](figures/")
        .skip(1)
        .map(|l| &l[..l.find(')').unwrap()])
        .collect();
    assert_eq!(links.len(), 3 + 2 * 4);
    for name in links {
        assert!(files.iter().any(|f| f == name), "{name} not written");
    }
}

/// `rcx reproduce --only llama_x` over a tiny decoder run, with the results file `out`.
fn reproduce_llama(dir: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["reproduce", "--only", "llama_x"])
        .arg("--configs")
        .arg(dir)
        .arg("--runs")
        .arg(dir)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn reproduce_of_a_backbone_run_rewrites_its_section_and_keeps_the_bert_one() {
    let dir = scratch("sections-cli");
    tiny_run(
        &dir,
        "llama_x",
        &[("model_name", "llama-tiny"), ("loss", "x")],
    );
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    let out = docs.join("results.md");
    let bert = paper_runs_markdown(&reproduction(
        vec![adaptive_run()],
        "rcx reproduce --only x_adaptive",
    ));
    let before = compose(&SECTIONS, &[("bert", bert.clone())], &[]);

    // A file whose sections cannot be kept is refused before any training.
    let broken = before.replace("<!-- rcx reproduce: end of section bert -->\n", "");
    std::fs::write(&out, &broken).unwrap();
    let refused = reproduce_llama(&dir, &out);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("results.md:") && stderr.contains("no end marker"),
        "{stderr}"
    );
    assert!(!dir.join("llama_x").exists());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), broken);

    std::fs::write(&out, &before).unwrap();
    let made = reproduce_llama(&dir, &out);
    let stderr = String::from_utf8_lossy(&made.stderr);
    assert!(made.status.success(), "{stderr}");
    assert!(stderr.contains("keeping section bert"), "{stderr}");
    let after = std::fs::read_to_string(&out).unwrap();
    assert_eq!(section_text(&after, "bert"), Some(bert.as_str()));
    let section = section_text(&after, "backbones").expect("the backbones' section");
    assert!(
        section.contains("| llama-tiny | llama_x | U = x |"),
        "{section}"
    );
    assert!(section.contains("`llama-tiny` (2 layers, hidden 128, 4 heads (2 key/value)"));
    assert!(after.contains("made by `rcx reproduce --only llama_x --configs"));
    let figures = docs.join("figures");
    for written in ["llama_x_panels.svg", "backbones_figure_eval.svg"] {
        assert!(figures.join(written).is_file(), "{written}");
    }
    // BERT's figures belong to the section kept: none is drawn again.
    assert!(!figures.join("paper_figure_eval.svg").exists());
    assert!(!figures.join("collapse_gap_by_step.svg").exists());
}
