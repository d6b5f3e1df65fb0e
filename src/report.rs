//! `rcx reproduce`: trains the paper's five runs (and one on the pretrained MiniLM-L6) on
//! BERT and the runs on the other backbones (a Llama-style decoder, DeBERTa-v3), evaluates
//! every final model on training and evaluation prompts, draws the figures and writes
//! `docs/results.md` with the targets judged PASS or MISS: one section per group of
//! runs (`document`), the BERT runs' here and the other backbones' in `backbones`.

pub mod backbones;
pub mod document;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::eval::{EvalReport, Scored, TypeStats, evaluate_model};
use crate::figures::{
    MetricsRecord, largest_gap, loss_title, paper_figure, read_metrics, reward_histogram_panel,
    reward_panel, training_curves,
};
use crate::loss::{LossSpec, TIE_TOLERANCE};
use crate::plot::{Figure, LegendPosition, Line, PALETTE, Panel};
use crate::provenance::Provenance;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The paper's five runs, in the order of its figure.
pub const PAPER_RUNS: [&str; 5] = ["x", "x_inv", "log", "logsigmoid", "x_adaptive"];
/// The prompt-aware run on the pretrained MiniLM-L6.
pub const MINILM_RUN: &str = "minilm_x_adaptive";
/// Runs made only when `--only` names them: `x` at the other runs' rate 1e-3, where its
/// network stops depending on its input (why configs/x.yml runs at 5e-4).
pub const EXTRA_RUNS: [&str; 1] = ["x_lr1e-3"];
/// The paper's runs on the other backbones: a decoder (`llama-tiny`) and DeBERTa-v3's
/// structure (`deberta-v3-tiny`), both from scratch (issues 12 and 13).
pub const BACKBONE_RUNS: [&str; 5] = [
    "llama_x",
    "llama_x_inv",
    "llama_x_adaptive",
    "deberta_x",
    "deberta_x_adaptive",
];
/// results.md's sections, in the file's order.
pub const SECTIONS: [document::Section; 2] = [
    document::Section {
        key: "bert",
        title: "The paper's runs on BERT",
        anchor: None,
        runs: &[
            "x",
            "x_inv",
            "log",
            "logsigmoid",
            "x_adaptive",
            MINILM_RUN,
            "x_lr1e-3",
        ],
        markdown: paper_runs_markdown,
        figures: figure_files,
    },
    document::Section {
        key: "backbones",
        title: backbones::TITLE,
        anchor: Some(backbones::ANCHOR),
        runs: &BACKBONE_RUNS,
        markdown: backbones::backbones_markdown,
        figures: backbones::figure_files,
    },
];
/// Where `scripts/fetch-minilm.sh` puts the pretrained model.
pub const MINILM_DIR: &str = ".models/all-MiniLM-L6-v2";
/// How many training prompts (the first of the file) each final model is scored on:
/// enough for stable means per rank, cheap next to training.
pub const TRAIN_SUBSET: usize = 300;
/// The bounds: collapse gap at most this for a single utility...
pub const COLLAPSE_GAP_MAX: f64 = 0.03;
/// ...at least this for the prompt-aware utility...
pub const SEPARATION_GAP_MIN: f64 = 0.15;
/// ...and every mean curve within this of its predicted optimum.
pub const OPTIMUM_DISTANCE_MAX: f64 = 0.03;

/// A trained model's size, read from its folder (config.json and the safetensors header).
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    /// Grouped-query attention's key/value heads (a decoder's `num_key_value_heads`), when
    /// fewer than the heads.
    pub kv_heads: Option<usize>,
    pub parameters: usize,
}

impl Architecture {
    /// The sizes every architecture's config.json names alike (BERT, the Llama family,
    /// DeBERTa), with the parameters counted from the safetensors header.
    pub fn of_model_dir(dir: &Path) -> Result<Architecture> {
        let path = dir.join("config.json");
        let obj = crate::hf_config::read_json_object(&path)?;
        let keys = crate::hf_config::ConfigKeys {
            path: &path,
            obj: &obj,
        };
        let heads = keys.positive("num_attention_heads")?;
        let kv_heads = keys
            .optional_usize("num_key_value_heads")?
            .filter(|&kv| kv < heads);
        let weights = crate::safetensors::SafeTensors::open(&dir.join("model.safetensors"))?;
        let parameters = weights
            .names()
            .iter()
            .filter_map(|n| weights.get(n))
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        Ok(Architecture {
            layers: keys.positive("num_hidden_layers")?,
            hidden: keys.positive("hidden_size")?,
            heads,
            kv_heads,
            parameters,
        })
    }

    fn describe(&self) -> String {
        let kv = self
            .kv_heads
            .map_or(String::new(), |kv| format!(" ({kv} key/value)"));
        format!(
            "{} layers, hidden {}, {} heads{kv}, {:.1}M parameters",
            self.layers,
            self.hidden,
            self.heads,
            self.parameters as f64 / 1e6
        )
    }
}

/// One run's settings and measurements.
pub struct RunResult {
    pub name: String,
    pub loss: String,
    pub model: String,
    pub steps: usize,
    pub learning_rate: f64,
    /// The shift of the extended utilities it trained with.
    pub eps: f64,
    /// Prompts per optimizer step (micro-batch times accumulation).
    pub prompts_per_step: usize,
    /// Prompts in its training files.
    pub train_prompts: usize,
    pub architecture: Architecture,
    /// What its rcx.json records of its origin (None for folders from before provenance).
    pub provenance: Option<Provenance>,
    /// Training wall time, from the run's last metrics line (start to last evaluation).
    pub train_wall_s: f64,
    /// Scoring the train subset and the eval split after training.
    pub eval_wall_s: f64,
    /// Whether a finished run was reused instead of trained again (`--reuse`).
    pub reused: bool,
    pub on_train: Scored,
    pub on_eval: Scored,
    pub metrics: Vec<MetricsRecord>,
}

/// Everything results.md reports.
pub struct Reproduction {
    pub runs: Vec<RunResult>,
    /// Runs not made, with the reason.
    pub skipped: Vec<(String, String)>,
    pub total_wall_s: f64,
    /// Where it ran: cores and load, for reading the wall times.
    pub machine: String,
    /// results.md's links to figures are relative to its folder: `figures/NAME.svg`.
    pub figures_dir: String,
    /// The command line that made it.
    pub command: String,
}

/// One row of the PASS/MISS table.
pub struct Check {
    pub run: String,
    pub split: &'static str,
    pub what: String,
    pub measured: f64,
    pub target: String,
    pub pass: bool,
    /// Extra facts beside the judged number (the pure-form distance).
    pub note: String,
}

fn split_name(on_train: bool) -> &'static str {
    if on_train { "train" } else { "eval" }
}

/// The targets for one run: the gap (coinciding for a single utility, separated
/// for a prompt-aware one) on train and eval prompts, and every curve's distance to the
/// optimum of its trained utility (eps as trained; the pure form's distance as a note).
pub fn checks(run: &RunResult) -> Vec<Check> {
    let mut out = Vec::new();
    let prompt_aware = LossSpec::parse(&run.loss).is_ok_and(|s| s.is_prompt_aware());
    for (on_train, scored) in [(true, &run.on_train), (false, &run.on_eval)] {
        let split = split_name(on_train);
        if let Some(gap) = scored.report.collapse_gap {
            let (what, target, pass) = if prompt_aware {
                (
                    "types separate: collapse gap",
                    format!(">= {SEPARATION_GAP_MIN}"),
                    gap >= SEPARATION_GAP_MIN,
                )
            } else {
                (
                    "types coincide: collapse gap",
                    format!("<= {COLLAPSE_GAP_MAX}"),
                    gap <= COLLAPSE_GAP_MAX,
                )
            };
            out.push(Check {
                run: run.name.clone(),
                split,
                what: what.into(),
                measured: gap,
                target,
                pass,
                note: String::new(),
            });
        }
        for (t, pure) in scored.report.by_type.iter().zip(&scored.pure.by_type) {
            let (Some(p), Some(pp)) = (&t.prediction, &pure.prediction) else {
                continue;
            };
            out.push(Check {
                run: run.name.clone(),
                split,
                what: format!(
                    "{} curve to optimum of {} (eps {})",
                    t.prompt_type, p.utility, p.eps
                ),
                measured: p.distance,
                target: format!("<= {OPTIMUM_DISTANCE_MAX}"),
                pass: p.distance <= OPTIMUM_DISTANCE_MAX,
                note: format!(
                    "pure form (eps 0): {:.4} {}",
                    pp.distance,
                    pass_word(pp.distance <= OPTIMUM_DISTANCE_MAX)
                ),
            });
        }
    }
    out
}

fn pass_word(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

fn minutes(seconds: f64) -> String {
    format!("{:.1} min", seconds / 60.0)
}

/// The distance of one type's curve to its optimum: trained eps and pure, "a / b".
fn distances(scored: &Scored, ty: &str) -> String {
    let d = |r: &EvalReport| {
        r.for_type(ty)
            .and_then(|t| t.prediction.as_ref())
            .map(|p| p.distance)
    };
    match (d(&scored.report), d(&scored.pure)) {
        (Some(a), Some(b)) => format!("{a:.4} / {b:.4}"),
        _ => "-".into(),
    }
}

fn summary_table(s: &mut String, runs: &[RunResult], on_train: bool) {
    let _ = writeln!(
        s,
        "| run | prompts | collapse gap | open acc | closed acc | closed ties | closed wrong | \
         closed long-vs-short | open dist (trained eps / pure) | closed dist (trained eps / \
         pure) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for run in runs {
        let scored = if on_train {
            &run.on_train
        } else {
            &run.on_eval
        };
        let r = &scored.report;
        let stat = |ty: &str, f: fn(&TypeStats) -> f64| fmt_opt(r.for_type(ty).map(f));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.name,
            r.prompts,
            fmt_opt(r.collapse_gap),
            stat("open", |t| t.pairwise_accuracy),
            stat("closed", |t| t.pairwise_accuracy),
            stat("closed", |t| t.tie_rate),
            stat("closed", |t| t.wrong_rate),
            stat("closed", |t| t.cross_half_accuracy),
            distances(scored, "open"),
            distances(scored, "closed"),
        );
    }
}

/// The collapse gap at every evaluation of a run, with the per-type accuracies.
fn gap_by_step_table(s: &mut String, run: &RunResult) {
    let _ = writeln!(
        s,
        "| step | collapse gap | open acc | closed acc | closed ties | eval loss |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for m in &run.metrics {
        let r = &m.report;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.4} |",
            m.step,
            fmt_opt(r.collapse_gap),
            fmt_opt(r.for_type("open").map(|t| t.pairwise_accuracy)),
            fmt_opt(r.for_type("closed").map(|t| t.pairwise_accuracy)),
            fmt_opt(r.for_type("closed").map(|t| t.tie_rate)),
            m.eval_loss
        );
    }
}

/// The theory's n = K optima (pure and as trained) beside a run's measured means on the
/// eval prompts: per prompt type three columns.
fn optima_table(s: &mut String, run: &RunResult) {
    let r = &run.on_eval;
    let typed: Vec<(
        &TypeStats,
        &crate::eval::Prediction,
        &crate::eval::Prediction,
    )> = r
        .report
        .by_type
        .iter()
        .zip(&r.pure.by_type)
        .filter_map(|(t, pure)| Some((t, t.prediction.as_ref()?, pure.prediction.as_ref()?)))
        .collect();
    let Some(k) = typed.iter().map(|(t, _, _)| t.ranks.len()).max() else {
        return;
    };
    let _ = write!(
        s,
        "\n`{}` ({}):\n\n| index |",
        run.name,
        loss_title(&run.loss)
    );
    for (t, p, _) in &typed {
        let _ = write!(
            s,
            " {ty}: `{u}` pure | {ty}: `{u}` eps {eps} | {ty}: measured |",
            ty = t.prompt_type,
            u = p.utility,
            eps = p.eps
        );
    }
    let _ = write!(s, "\n|---|{}\n", "---|---|---|".repeat(typed.len()));
    for i in 0..k {
        let _ = write!(s, "| {} |", i + 1);
        for (t, p, pure) in &typed {
            let cell = |v: Option<&f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
            let _ = write!(
                s,
                " {} | {} | {} |",
                cell(pure.optimum.get(i)),
                cell(p.optimum.get(i)),
                cell(t.ranks.get(i).map(|r| &r.mean))
            );
        }
        s.push('\n');
    }
}

/// A run's own figures, by file name: its panels (eval prompts, train prompts, the
/// histogram of every reward) and its training curves.
pub fn run_figures(run: &RunResult) -> [(String, Figure); 2] {
    let title = format!("{} ({})", run.name, loss_title(&run.loss));
    [
        (
            format!("{}_panels.svg", run.name),
            Figure::new()
                .title(&title)
                .panel(reward_panel("eval prompts", &run.on_eval.report))
                .panel(reward_panel("train prompts", &run.on_train.report))
                .panel(reward_histogram_panel(
                    "rewards, eval prompts",
                    &run.on_eval.scores,
                    40,
                )),
        ),
        (
            format!("{}_curves.svg", run.name),
            training_curves(&[(run.name.clone(), run.metrics.clone())]).title(&title),
        ),
    ]
}

/// Every run's collapse gap on the eval prompts at each evaluation, the bounds dashed;
/// the run named `highlight` drawn wider.
pub fn gap_by_step_figure(runs: &[&RunResult], highlight: Option<&str>) -> Figure {
    let curves: Vec<(String, Vec<MetricsRecord>)> = runs
        .iter()
        .map(|r| (r.name.clone(), r.metrics.clone()))
        .collect();
    let last_step = runs.iter().map(|r| r.steps).max().unwrap_or(1) as f64;
    // Headroom above the curves for the legend, one row per run.
    let top = (1.0 + 0.3 * runs.len() as f64) * largest_gap(&curves).max(SEPARATION_GAP_MIN);
    let mut gap = Panel::new("collapse gap on the eval prompts")
        .x_label("step")
        .y_label("mean |open - closed|")
        .x_range(0.0, last_step)
        .y_range(0.0, top)
        .legend(LegendPosition::UpperRight);
    for bound in [COLLAPSE_GAP_MAX, SEPARATION_GAP_MIN] {
        gap = gap.line(
            Line::new(vec![0.0, last_step], vec![bound, bound])
                .color("#999999")
                .dashed()
                .width(1.0),
        );
    }
    for (i, (name, records)) in curves.iter().enumerate() {
        let xs = records.iter().map(|m| m.step as f64).collect();
        let ys = records
            .iter()
            .map(|m| m.report.collapse_gap.unwrap_or(f64::NAN))
            .collect();
        let width = if highlight == Some(name.as_str()) {
            2.5
        } else {
            1.2
        };
        gap = gap.line(
            Line::new(xs, ys)
                .label(name)
                .color(PALETTE[i % PALETTE.len()])
                .width(width)
                .markers(),
        );
    }
    Figure::new().panel(gap)
}

/// The figures of the BERT section, by file name under the figures folder.
pub fn figure_files(runs: &[RunResult]) -> Vec<(String, Figure)> {
    let mut out = Vec::new();
    let paper: Vec<&RunResult> = runs
        .iter()
        .filter(|r| PAPER_RUNS.contains(&r.name.as_str()))
        .collect();
    for on_train in [false, true] {
        let panels: Vec<(String, &EvalReport)> = paper
            .iter()
            .map(|r| {
                let scored = if on_train { &r.on_train } else { &r.on_eval };
                (loss_title(&r.loss), &scored.report)
            })
            .collect();
        if !panels.is_empty() {
            let title = format!(
                "{} prompts: mean reward by response index",
                split_name(on_train)
            );
            out.push((
                format!("paper_figure_{}.svg", split_name(on_train)),
                paper_figure(Some(&title), &panels),
            ));
        }
    }
    for run in runs {
        out.extend(run_figures(run));
    }
    if !runs.is_empty() {
        // Log-sigmoid is the run whose gap the paper follows across training.
        let all: Vec<&RunResult> = runs.iter().collect();
        out.push((
            "collapse_gap_by_step.svg".into(),
            gap_by_step_figure(&all, Some("logsigmoid")),
        ));
    }
    out
}

/// `a`, `a and b`, `a, b and c`, each in backquotes.
fn names_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        None => "no run".into(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The n of the theory's optima: the most completions a prompt of the eval split has.
fn completions_per_prompt(runs: &[RunResult]) -> Option<usize> {
    runs.iter()
        .flat_map(|run| &run.on_eval.report.by_type)
        .map(|t| t.ranks.len())
        .max()
}

/// Runs grouped by a value of theirs, in order of first appearance: "v (a, b); w (c)", or
/// "v (every run)" when they share it.
fn grouped_by(runs: &[RunResult], value: impl Fn(&RunResult) -> String) -> String {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for run in runs {
        let v = value(run);
        match groups.iter_mut().find(|(g, _)| *g == v) {
            Some((_, names)) => names.push(&run.name),
            None => groups.push((v, vec![&run.name])),
        }
    }
    if let [(v, _)] = &groups[..] {
        return format!("{v} (every run)");
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(v, names)| format!("{v} ({})", names.join(", ")))
        .collect();
    parts.join("; ")
}

fn eps_list(runs: &[RunResult]) -> String {
    grouped_by(runs, |run| run.eps.to_string())
}

/// Passes over the training prompts that `steps` steps of a run make.
fn passes(run: &RunResult) -> f64 {
    (run.steps * run.prompts_per_step) as f64 / run.train_prompts.max(1) as f64
}

/// What the runs trained, how long and at which settings, from their configs, model folders
/// and metrics; the paper's own setting is the one fixed fact.
fn setup_paragraph(runs: &[RunResult], paper: &[&RunResult]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "Why this size: the paper fine-tuned DeBERTa-v3-base for 1,000 steps on a GPU. Here ",
    );
    let shape = |run: &RunResult| {
        let start = if crate::models::named(&run.model).is_some() {
            "from scratch"
        } else {
            "from its pretrained weights"
        };
        format!(
            "`{}` ({}) {start} for {} steps of {} prompts (about {:.1} passes over its {} \
             training prompts)",
            run.model,
            run.architecture.describe(),
            run.steps,
            run.prompts_per_step,
            passes(run),
            run.train_prompts
        )
    };
    let walls = |group: &[&RunResult]| {
        let lo = group
            .iter()
            .map(|r| r.train_wall_s)
            .fold(f64::INFINITY, f64::min);
        let hi = group.iter().map(|r| r.train_wall_s).fold(0.0, f64::max);
        if group.len() == 1 {
            minutes(hi)
        } else {
            format!("{} to {} per run", minutes(lo), minutes(hi))
        }
    };
    let names = |group: &[&RunResult]| {
        names_list(&group.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
    };
    let mut groups: Vec<(String, Vec<&RunResult>)> = Vec::new();
    for run in runs {
        let key = shape(run);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(run),
            None => groups.push((key, vec![run])),
        }
    }
    let sentences: Vec<String> = groups
        .iter()
        .map(|(key, members)| {
            format!(
                "{} {} {key}, which took {} to train",
                names(members),
                if members.len() == 1 {
                    "trains"
                } else {
                    "train"
                },
                walls(members)
            )
        })
        .collect();
    s += &sentences.join("; ");
    let _ = write!(
        s,
        ". Learning rates: {}. The shift eps: {}.",
        grouped_by(runs, |run| format!("{:e}", run.learning_rate)),
        eps_list(runs)
    );
    if let Some(main) = paper.iter().find(|run| run.name == "x_adaptive")
        && let Some(last) = main.metrics.last()
    {
        let r = &last.report;
        let _ = write!(
            s,
            " The main run, `x_adaptive`, ends (step {}) with open-ended pairwise accuracy {} \
             and closed-ended long-vs-short accuracy {} on the eval prompts.",
            last.step,
            fmt_opt(r.for_type("open").map(|t| t.pairwise_accuracy)),
            fmt_opt(r.for_type("closed").map(|t| t.cross_half_accuracy))
        );
    }
    if let (Some(x), Some(fast)) = (
        runs.iter().find(|run| run.name == "x"),
        runs.iter().find(|run| run.name == EXTRA_RUNS[0]),
    ) {
        let _ = write!(
            s,
            " `{}` is `x` at rate {:e} instead of {:e} (made only when `--only` names it), to \
             show whether `x`'s network stops depending on its input at the higher rate.",
            fast.name, fast.learning_rate, x.learning_rate
        );
    }
    s += "\n\n";
    s
}

/// The text of results.md's section on the BERT runs (`SECTIONS[0]`).
pub fn paper_runs_markdown(r: &Reproduction) -> String {
    let fig = |name: &str| format!("{}/{name}", r.figures_dir);
    let mut s = String::new();
    let paper: Vec<&RunResult> = r
        .runs
        .iter()
        .filter(|run| PAPER_RUNS.contains(&run.name.as_str()))
        .collect();
    let _ = write!(
        s,
        "Written by `rcx reproduce` (do not edit by hand: rerun it). It trains {}, then scores \
         every final model on the eval split and on the first {TRAIN_SUBSET} training prompts, \
         and compares the mean reward at each response index with the theory's optimum for \
         n = {} (`rcx theory`). Every number below is computed from the runs.\n\n",
        names_list(
            &r.runs
                .iter()
                .map(|run| run.name.as_str())
                .collect::<Vec<_>>()
        ),
        completions_per_prompt(&r.runs).map_or("-".into(), |k| k.to_string())
    );
    let _ = writeln!(s, "Made by `{}`.\n", r.command);
    let _ = write!(
        s,
        "Total wall time: **{}**; {}.",
        minutes(r.total_wall_s),
        r.machine
    );
    let reused: Vec<&RunResult> = r.runs.iter().filter(|run| run.reused).collect();
    let default_runs = r
        .runs
        .iter()
        .filter(|run| !EXTRA_RUNS.contains(&run.name.as_str()));
    if !reused.is_empty() {
        let _ = write!(
            s,
            " {} of the runs were trained earlier and reused (`--reuse`, each matching its \
             config and data by the SHA-256 its rcx.json records): their {} of training are \
             not in that total. Training the default runs (all but {}) took {} and scoring \
             them {}: a fresh `rcx reproduce` takes about the sum.",
            reused.len(),
            minutes(reused.iter().map(|run| run.train_wall_s).sum()),
            EXTRA_RUNS.join(", "),
            minutes(default_runs.clone().map(|run| run.train_wall_s).sum()),
            minutes(default_runs.map(|run| run.eval_wall_s).sum())
        );
    }
    s += "\n\n";
    s += &setup_paragraph(&r.runs, &paper);
    let _ = writeln!(
        s,
        "Distances are the mean over the response indices of |measured mean reward - \
         optimum|. Two optima are reported: the one of the extended utility that training \
         maximises (shifted by the run's eps: {}; the authors' form) and the pure form of \
         the paper's theory (eps = 0, the paper's dashed lines). The targets are judged on \
         the first; the second is in the notes.\n",
        eps_list(&r.runs)
    );
    for (name, why) in &r.skipped {
        let _ = writeln!(s, "Skipped `{name}`: {why}\n");
    }

    s += "## Targets (issue 5)\n\n";
    targets_table(&mut s, &r.runs);
    s += "## Per run\n\nWall time is training (from its start to the last evaluation) and, \
          after it, scoring the eval split and the training subset.\n\n";
    per_run_table(&mut s, &r.runs);
    s += "\nOn the eval prompts (the held-out split):\n\n";
    summary_table(&mut s, &r.runs, false);
    let _ = write!(
        s,
        "\nOn the training prompts (the first {TRAIN_SUBSET} of the training file):\n\n"
    );
    summary_table(&mut s, &r.runs, true);
    let _ = write!(
        s,
        "\nAccuracy counts a pair as correct when the better completion's reward is higher \
         by more than {TIE_TOLERANCE}; ties (within {TIE_TOLERANCE}) are reported apart from \
         wrong orders, since U = x is meant to tie the completions inside each cluster of a \
         closed-ended prompt. Long-vs-short is the accuracy over pairs across the two \
         clusters.\n\n"
    );

    s += "## The paper's figure\n\n";
    let _ = writeln!(
        s,
        "![paper figure, eval prompts]({})\n\n![paper figure, train prompts]({})\n",
        fig("paper_figure_eval.svg"),
        fig("paper_figure_train.svg")
    );
    s += "Each panel: mean reward against response index (1 = worst), open-ended prompts in \
          blue, closed-ended in red, shaded between the 10th and 90th percentiles, the optimum \
          of the trained utility (eps as trained) dashed.\n\n";

    if let Some(run) = r.runs.iter().find(|run| run.name == "logsigmoid") {
        s += "## Log-sigmoid: the collapse gap across training\n\n";
        s += "The paper sees the two prompt types differ early in training and coincide by the \
              end. The gap on the eval prompts at every evaluation:\n\n";
        gap_by_step_table(&mut s, run);
        let _ = writeln!(
            s,
            "\n![collapse gap by step]({})\n\nEvery run's gap; the dashed lines are the bounds \
             {COLLAPSE_GAP_MAX} and {SEPARATION_GAP_MIN}.\n",
            fig("collapse_gap_by_step.svg")
        );
    }

    let _ = writeln!(
        s,
        "## The theory's optima for n = {} beside the measured means (eval prompts)",
        completions_per_prompt(&r.runs).map_or("-".into(), |k| k.to_string())
    );
    for run in &r.runs {
        optima_table(&mut s, run);
    }
    s += "\n## Figures per run\n\nFor each run: the panel on the eval and the train prompts \
          and the histogram of every reward per prompt type; then the training curves (eval \
          loss, pairwise accuracy, collapse gap against step).\n\n";
    for run in &r.runs {
        let _ = writeln!(
            s,
            "### {}\n\n![{} panels]({})\n\n![{} curves]({})\n",
            run.name,
            run.name,
            fig(&format!("{}_panels.svg", run.name)),
            run.name,
            fig(&format!("{}_curves.svg", run.name))
        );
    }
    s
}

/// The PASS/MISS table of every run's checks, then where each miss misses and what a run
/// whose model gives one reward for everything measured before that began.
fn targets_table(s: &mut String, runs: &[RunResult]) {
    *s += "| run | prompts | check | measured | target | result | note |\n|---|---|---|---|---|---|---|\n";
    let mut misses = Vec::new();
    for run in runs {
        for c in checks(run) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.4} | {} | {} | {} |",
                c.run,
                c.split,
                c.what,
                c.measured,
                c.target,
                pass_word(c.pass),
                c.note
            );
            if !c.pass {
                misses.push(c);
            }
        }
    }
    if misses.is_empty() {
        *s += "\nEvery target is met.\n\n";
    } else {
        let _ = writeln!(
            s,
            "\n{} of the checks miss; they are kept as measured. Where each one misses (the \
             response indices farthest from the optimum):\n",
            misses.len()
        );
        for c in &misses {
            let _ = writeln!(s, "- {}", miss_detail(runs, c));
        }
        *s += "\n";
        for run in runs {
            if let Some(note) = dead_model_note(run) {
                let _ = writeln!(s, "{note}\n");
            }
        }
    }
}

/// Each run's settings, wall times and provenance, one row per run.
fn per_run_table(s: &mut String, runs: &[RunResult]) {
    *s += "| run | loss | model | size | steps | prompts per step | passes | learning rate | \
          eps | train wall | scoring wall | config sha256 | commit |\n\
          |---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for run in runs {
        let recorded = |f: fn(&Provenance) -> Option<&str>| {
            run.provenance
                .as_ref()
                .and_then(f)
                .map_or("-".to_string(), |h| {
                    format!("`{}`", h.get(..12).unwrap_or(h))
                })
        };
        let _ = writeln!(
            s,
            "| {} | `{}` ({}) | {} | {} | {} | {} | {:.1} | {:e} | {} | {}{} | {:.0} s | {} | {} |",
            run.name,
            run.loss,
            loss_title(&run.loss),
            run.model,
            run.architecture.describe(),
            run.steps,
            run.prompts_per_step,
            passes(run),
            run.learning_rate,
            run.eps,
            minutes(run.train_wall_s),
            if run.reused { " (reused)" } else { "" },
            run.eval_wall_s,
            recorded(|p| Some(p.config_sha256.as_str())),
            recorded(|p| p.git_commit.as_deref())
        );
    }
}

/// Whether every pair of every prompt ties: the rewards no longer depend on the input.
fn all_tied(report: &EvalReport) -> bool {
    report.prompts > 0 && report.tie_rate >= DEAD_TIE_RATE
}

/// A tie rate this close to 1 over every prompt means one reward for everything.
const DEAD_TIE_RATE: f64 = 0.999;

/// When a run's final model gives every completion the same reward: when that began in
/// training and what the last evaluation before it measured.
pub fn dead_model_note(run: &RunResult) -> Option<String> {
    if !all_tied(&run.on_eval.report) {
        return None;
    }
    let reward = run.on_eval.report.by_type.first()?.ranks.first()?.mean;
    let first_dead = run.metrics.iter().position(|m| all_tied(&m.report))?;
    let mut s = format!(
        "`{}`: the final model gives every completion of every prompt the same reward \
         ({reward:.4}): its output no longer depends on its input, and training did not leave \
         that state. Its collapse gap of 0 is that of a constant, not of the curve the theory \
         predicts, so the gap check passes vacuously. It first appears at the evaluation of \
         step {} and lasts to the end (step {}).",
        run.name,
        run.metrics[first_dead].step,
        run.metrics.last().map_or(0, |m| m.step)
    );
    if let Some(healthy) = first_dead.checked_sub(1).map(|i| &run.metrics[i]) {
        let r = &healthy.report;
        let _ = write!(
            s,
            " At step {} the model still ranked: collapse gap {}, open accuracy {}, closed \
             long-vs-short {}; mean rewards by index, open {}, closed {}.",
            healthy.step,
            fmt_opt(r.collapse_gap),
            fmt_opt(r.for_type("open").map(|t| t.pairwise_accuracy)),
            fmt_opt(r.for_type("closed").map(|t| t.cross_half_accuracy)),
            means(r, "open"),
            means(r, "closed")
        );
    }
    Some(s)
}

fn means(report: &EvalReport, ty: &str) -> String {
    report.for_type(ty).map_or("-".into(), |t| {
        let values: Vec<String> = t.ranks.iter().map(|r| format!("{:.2}", r.mean)).collect();
        format!("[{}]", values.join(", "))
    })
}

/// A missed check, with the response indices farthest from the optimum.
fn miss_detail(runs: &[RunResult], c: &Check) -> String {
    let Some(run) = runs.iter().find(|run| run.name == c.run) else {
        return c.what.clone();
    };
    let scored = if c.split == "train" {
        &run.on_train
    } else {
        &run.on_eval
    };
    let mut s = format!(
        "`{}` on {} prompts, {}: {:.4} (target {}).",
        c.run, c.split, c.what, c.measured, c.target
    );
    if c.what.starts_with("types") {
        if let (Some(o), Some(cl)) = (
            scored.report.for_type("open"),
            scored.report.for_type("closed"),
        ) {
            let mut diffs: Vec<(usize, f64, f64)> = o
                .ranks
                .iter()
                .zip(&cl.ranks)
                .enumerate()
                .map(|(i, (a, b))| (i + 1, a.mean, b.mean))
                .collect();
            diffs.sort_by(|a, b| (b.1 - b.2).abs().total_cmp(&(a.1 - a.2).abs()));
            for (i, a, b) in diffs.iter().take(3) {
                let _ = write!(s, " Index {i}: open {a:.3}, closed {b:.3}.");
            }
        }
        return s;
    }
    let ty = c.what.split(' ').next().unwrap_or("");
    if let (Some(t), Some(pure)) = (scored.report.for_type(ty), scored.pure.for_type(ty))
        && let (Some(p), Some(pp)) = (&t.prediction, &pure.prediction)
    {
        let mut rows: Vec<usize> = (0..t.ranks.len()).collect();
        rows.sort_by(|&a, &b| {
            (t.ranks[b].mean - p.optimum[b])
                .abs()
                .total_cmp(&(t.ranks[a].mean - p.optimum[a]).abs())
        });
        for &i in rows.iter().take(3) {
            let _ = write!(
                s,
                " Index {}: mean {:.3}, optimum {:.3} (pure {:.3}).",
                i + 1,
                t.ranks[i].mean,
                p.optimum[i],
                pp.optimum[i]
            );
        }
    }
    s
}

/// `rcx reproduce`: train the paper's runs (on BERT and on the other backbones), evaluate
/// them, write their sections of docs/results.md with figures.
#[derive(clap::Args, Debug)]
pub struct ReproduceArgs {
    /// The markdown report; figures go to `figures/` beside it.
    #[arg(long, default_value = "docs/results.md")]
    pub out: PathBuf,
    /// The folder of the runs (each in DIR/NAME); runs there are overwritten.
    #[arg(long, default_value = "runs/reproduce")]
    pub runs: PathBuf,
    /// The folder of the configs NAME.yml.
    #[arg(long, default_value = "configs")]
    pub configs: PathBuf,
    /// Leave out the pretrained MiniLM-L6 run.
    #[arg(long)]
    pub skip_minilm: bool,
    /// Only these runs, comma-separated: of the BERT section x, x_inv, log, logsigmoid,
    /// x_adaptive, minilm_x_adaptive, and x_lr1e-3, which is made only when named here; of
    /// the other backbones' llama_x, llama_x_inv, llama_x_adaptive, deberta_x,
    /// deberta_x_adaptive. Only the sections of the runs named are rewritten in --out; the
    /// others are kept as they are.
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// Keep a run that already finished in DIR/NAME (its final model and a metrics.jsonl
    /// reaching max_steps) instead of training it again, to rewrite the report: only when
    /// its rcx.json records the SHA-256 of the config and data files it names now; any other
    /// is trained again, saying why.
    #[arg(long)]
    pub reuse: bool,
    /// Where to train, overriding every config's `device:`.
    #[arg(long, value_enum)]
    pub device: Option<crate::backend::Device>,
    /// The training arithmetic, overriding every config's `dtype:` (bf16: GPU only).
    #[arg(long, value_enum)]
    pub dtype: Option<crate::backend::DType>,
}

/// What the runs trained on (each engine once, in order; none when every run was reused)
/// and the CPU that scored them.
fn machine_description(engines: &[String], threads: usize) -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .map_or(String::new(), |l| format!(", load average {l} at the end"));
    let scored = format!("scored on a CPU with {threads} threads{load}");
    if engines.is_empty() {
        return scored;
    }
    format!("trained on {}, {scored}", engines.join(" and "))
}

/// The provenance a model folder's rcx.json records (None when it records none), or why
/// the file cannot be read.
fn read_provenance(dir: &Path) -> std::result::Result<Option<Provenance>, String> {
    let path = dir.join("rcx.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str::<crate::checkpoint::ModelMeta>(&text)
        .map(|meta| meta.provenance)
        .map_err(|e| format!("{}:{}: {e}", path.display(), e.line()))
}

/// Why the folder of `cfg`'s run cannot stand for it (None when it can): it must have
/// finished (a final model beside a metrics.jsonl whose last step is max_steps) and its
/// rcx.json must record the config file and data files that `cfg` names now, byte for byte.
pub fn reuse_refusal(cfg: &Config) -> Result<Option<String>> {
    let dir = &cfg.output_dir;
    if !dir.join("model.safetensors").is_file() {
        return Ok(Some("it holds no final model".into()));
    }
    let metrics = dir.join("metrics.jsonl");
    if !read_metrics(&metrics).is_ok_and(|m| m.last().is_some_and(|l| l.step == cfg.max_steps)) {
        return Ok(Some(format!(
            "{} does not end at max_steps {}",
            metrics.display(),
            cfg.max_steps
        )));
    }
    let recorded = match read_provenance(dir) {
        Ok(Some(recorded)) => recorded,
        Ok(None) => {
            return Ok(Some(format!(
                "{} records no provenance (config and data hashes)",
                dir.join("rcx.json").display()
            )));
        }
        Err(why) => return Ok(Some(why)),
    };
    Ok(recorded.mismatch(&Provenance::of_config(cfg)?))
}

pub fn cmd_reproduce(args: ReproduceArgs) -> Result<()> {
    let started = Instant::now();
    let mut names: Vec<&str> = SECTIONS
        .iter()
        .flat_map(|s| s.runs.iter().copied())
        .collect();
    match &args.only {
        Some(only) => {
            for name in only {
                if !names.contains(&name.as_str()) {
                    return Err(Error::user(format!(
                        "--only: unknown run `{name}`: expected some of {}",
                        names.join(", ")
                    )));
                }
            }
            names.retain(|n| only.iter().any(|o| o == n));
        }
        None => names.retain(|n| !EXTRA_RUNS.contains(n)),
    }
    // The sections this command does not rewrite are kept from the file: one it could not
    // keep them from is refused before any training.
    let kept = match std::fs::read_to_string(&args.out) {
        Ok(text) => document::parse_sections(&args.out, &text, &SECTIONS)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(&args.out, e)),
    };
    let mut skipped = Vec::new();
    if names.contains(&MINILM_RUN) {
        let why = if args.skip_minilm {
            Some("--skip-minilm was given".to_string())
        } else if !Path::new(MINILM_DIR).join("config.json").is_file() {
            Some(format!(
                "{MINILM_DIR} is not there (scripts/fetch-minilm.sh fetches it)"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            eprintln!("rcx reproduce: skipping {MINILM_RUN}: {why}");
            skipped.push((MINILM_RUN.to_string(), why));
            names.retain(|n| *n != MINILM_RUN);
        }
    }
    let train_data = crate::data::resolve_dataset(crate::data::SHIPPED_SET, false)
        .ok_or_else(|| Error::internal("the shipped train split does not resolve"))?;
    let eval_data = crate::data::resolve_dataset(crate::data::SHIPPED_SET, true)
        .ok_or_else(|| Error::internal("the shipped eval split does not resolve"))?;

    let mut runs = Vec::new();
    let mut engines: Vec<String> = Vec::new();
    for name in names {
        let mut cfg = Config::load(&args.configs.join(format!("{name}.yml")))?;
        cfg.output_dir = args.runs.join(name);
        let refusal = if args.reuse {
            reuse_refusal(&cfg)?
        } else {
            Some("--reuse was not given".into())
        };
        if let Some(why) = refusal.as_ref().filter(|_| args.reuse) {
            eprintln!(
                "rcx reproduce: {name}: not reusing {}: {why}",
                cfg.output_dir.display()
            );
        }
        let reused = refusal.is_none();
        if reused {
            eprintln!(
                "rcx reproduce: {name}: reusing {}",
                cfg.output_dir.display()
            );
        } else {
            eprintln!(
                "rcx reproduce: {name}: training {} steps into {}",
                cfg.max_steps,
                cfg.output_dir.display()
            );
            let options = crate::train::RunOptions {
                overwrite: true,
                quiet: true,
                device: args.device,
                dtype: args.dtype,
                ..Default::default()
            };
            let engine = crate::train::train(&cfg, options)?;
            if !engines.contains(&engine) {
                engines.push(engine);
            }
        }
        let metrics = read_metrics(&cfg.output_dir.join("metrics.jsonl"))?;
        let scoring = Instant::now();
        let on_eval = evaluate_model(&cfg.output_dir, &eval_data, None)?;
        let on_train = evaluate_model(&cfg.output_dir, &train_data, Some(TRAIN_SUBSET))?;
        let mut train_prompts = 0;
        for file in &cfg.train_files {
            train_prompts += crate::data::read_rankings(file, false)?.records.len();
        }
        let run = RunResult {
            name: name.to_string(),
            loss: cfg.loss_name.clone(),
            model: cfg.model_name.clone(),
            steps: cfg.max_steps,
            learning_rate: cfg.learning_rate,
            eps: cfg.eps,
            prompts_per_step: cfg
                .per_device_train_batch_size
                .saturating_mul(cfg.gradient_accumulation_steps),
            train_prompts,
            architecture: Architecture::of_model_dir(&cfg.output_dir)?,
            provenance: read_provenance(&cfg.output_dir).ok().flatten(),
            train_wall_s: metrics.last().map_or(0.0, |m| m.elapsed_s),
            eval_wall_s: scoring.elapsed().as_secs_f64(),
            reused,
            on_train,
            on_eval,
            metrics,
        };
        eprintln!(
            "rcx reproduce: {name}: trained in {}, collapse gap eval {} train {}",
            minutes(run.train_wall_s),
            fmt_opt(run.on_eval.report.collapse_gap),
            fmt_opt(run.on_train.report.collapse_gap)
        );
        runs.push(run);
    }

    let figures_dir = args.out.parent().unwrap_or(Path::new(".")).join("figures");
    std::fs::create_dir_all(&figures_dir).map_err(|e| Error::io(&figures_dir, e))?;
    let total_wall_s = started.elapsed().as_secs_f64();
    let machine = machine_description(&engines, rayon::current_num_threads());
    let command = std::iter::once("rcx".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut fresh = Vec::new();
    for section in &SECTIONS {
        let (own, rest): (Vec<RunResult>, Vec<RunResult>) = runs
            .into_iter()
            .partition(|run| section.runs.contains(&run.name.as_str()));
        runs = rest;
        if own.is_empty() {
            if kept.iter().any(|(key, _)| *key == section.key) {
                eprintln!(
                    "rcx reproduce: keeping section {} of {} as it was",
                    section.key,
                    args.out.display()
                );
            }
            continue;
        }
        for (file, figure) in (section.figures)(&own) {
            figure.write(&figures_dir.join(file))?;
        }
        let report = Reproduction {
            runs: own,
            skipped: skipped
                .iter()
                .filter(|(name, _)| section.runs.contains(&name.as_str()))
                .cloned()
                .collect(),
            total_wall_s,
            machine: machine.clone(),
            figures_dir: "figures".into(),
            command: command.clone(),
        };
        fresh.push((section.key, (section.markdown)(&report)));
    }
    write_atomically(&args.out, &document::compose(&SECTIONS, &fresh, &kept))?;
    eprintln!(
        "rcx reproduce: wrote {} ({}) and {} in {}",
        args.out.display(),
        fresh
            .iter()
            .map(|(key, _)| format!("section {key}"))
            .collect::<Vec<_>>()
            .join(", "),
        figures_dir.display(),
        minutes(started.elapsed().as_secs_f64())
    );
    Ok(())
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(|e| Error::io(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
