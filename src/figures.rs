//! The paper's figures, built on `crate::plot`: the reward panel of a run (mean reward
//! against response index per prompt type, a 10-90 percentile band, the theory's optimum
//! dashed), several runs side by side, histograms of the rewards per prompt type, and
//! training curves read back from `metrics.jsonl`. `rcx plot`.

use crate::error::{Error, Result};
use crate::eval::EvalReport;
use crate::loss::PromptType;
use crate::plot::{Band, Figure, Histogram, LegendPosition, Line, PALETTE, Panel};
use crate::scoring::PromptScores;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Colours of the prompt types, the same in every figure.
pub const OPEN_COLOR: &str = "#1f77b4";
pub const CLOSED_COLOR: &str = "#d62728";
pub const UNTYPED_COLOR: &str = "#2ca02c";
const OPTIMUM_COLOR: &str = "#222222";

/// One line of a run's `metrics.jsonl`, read back (written by `crate::train`).
#[derive(Clone, Debug, Deserialize)]
pub struct MetricsRecord {
    pub step: usize,
    pub train_loss: f64,
    pub learning_rate: f64,
    pub eval_loss: f64,
    pub elapsed_s: f64,
    #[serde(flatten)]
    pub report: EvalReport,
}

/// Every evaluation of a run, in the order written.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str::<MetricsRecord>(line).map_err(|e| {
            Error::user(format!(
                "{}:{}: not a metrics line written by rcx train: {e}",
                path.display(),
                i + 1
            ))
        })?;
        records.push(record);
    }
    if records.is_empty() {
        return Err(Error::user(format!(
            "{}:1: no evaluations recorded yet (rcx train writes one every eval_steps)",
            path.display()
        )));
    }
    Ok(records)
}

/// How the paper titles a panel: the utility in formula form.
pub fn loss_title(loss: &str) -> String {
    match loss {
        "x" => "U = x".into(),
        "log" => "U = log x".into(),
        "x_inv" => "U = -1/x".into(),
        "x2" => "U = x^2".into(),
        "x_inv2" => "U = -1/x^2".into(),
        "logsigmoid" => "U = log sigmoid(4x)".into(),
        "adaptive" => "prompt-aware (open -1/x, closed x)".into(),
        "adaptive2" => "prompt-aware (open -1/x^2, closed x^2)".into(),
        other => format!("U = {other}"),
    }
}

pub fn type_color(prompt_type: &str) -> &'static str {
    match prompt_type {
        "open" => OPEN_COLOR,
        "closed" => CLOSED_COLOR,
        _ => UNTYPED_COLOR,
    }
}

fn type_label(prompt_type: &str) -> String {
    match prompt_type {
        "open" => "open-ended".into(),
        "closed" => "closed-ended".into(),
        other => other.into(),
    }
}

/// The paper's panel: mean reward against response index 1..K (1 = worst) per prompt
/// type, with the 10-90 percentile band shaded, and the theory's optimum dashed: one line
/// when every type is trained with the same utility, else one per type in its colour.
pub fn reward_panel(title: &str, report: &EvalReport) -> Panel {
    let k = report
        .by_type
        .iter()
        .map(|t| t.ranks.len())
        .max()
        .unwrap_or(0);
    let index: Vec<f64> = (1..=k).map(|i| i as f64).collect();
    let mut panel = Panel::new(title)
        .x_label("response index (1 = worst)")
        .y_label("reward")
        .x_range(0.7, k as f64 + 0.3)
        .y_range(-0.04, 1.04)
        .x_ticks(index.clone())
        .legend(LegendPosition::UpperLeft);
    // Bands first so that every line is drawn over them.
    for t in &report.by_type {
        let xs = index[..t.ranks.len()].to_vec();
        panel = panel.band(
            Band::new(
                xs,
                t.ranks.iter().map(|r| r.p10).collect(),
                t.ranks.iter().map(|r| r.p90).collect(),
            )
            .color(type_color(&t.prompt_type))
            .opacity(0.18),
        );
    }
    for t in &report.by_type {
        let xs = index[..t.ranks.len()].to_vec();
        panel = panel.line(
            Line::new(xs, t.ranks.iter().map(|r| r.mean).collect())
                .label(&type_label(&t.prompt_type))
                .color(type_color(&t.prompt_type))
                .markers(),
        );
    }
    let predictions: Vec<(&str, &crate::eval::Prediction)> = report
        .by_type
        .iter()
        .filter_map(|t| Some((t.prompt_type.as_str(), t.prediction.as_ref()?)))
        .collect();
    let shared = predictions
        .windows(2)
        .all(|w| w[0].1.utility == w[1].1.utility && w[0].1.optimum == w[1].1.optimum);
    for (i, (ty, p)) in predictions.iter().enumerate() {
        if shared && i > 0 {
            break;
        }
        let xs = index[..p.optimum.len()].to_vec();
        let (label, color) = if shared {
            (
                format!("optimum {} (eps {})", p.utility, p.eps),
                OPTIMUM_COLOR,
            )
        } else {
            (format!("{ty} optimum {}", p.utility), type_color(ty))
        };
        panel = panel.line(
            Line::new(xs, p.optimum.clone())
                .label(&label)
                .color(color)
                .dashed()
                .width(1.5),
        );
    }
    panel
}

/// Several runs' panels side by side, as the paper's figure: (panel title, report).
pub fn paper_figure(title: Option<&str>, runs: &[(String, &EvalReport)]) -> Figure {
    let mut figure = Figure::new();
    if let Some(title) = title {
        figure = figure.title(title);
    }
    for (name, report) in runs {
        figure = figure.panel(reward_panel(name, report));
    }
    figure
}

/// The rewards of every completion, per prompt type, as overlaid density histograms on
/// [0, 1]: a step puts its mass at the ends, a spread curve fills the middle.
pub fn reward_histogram_panel(title: &str, scores: &[PromptScores], bins: usize) -> Panel {
    let mut panel = Panel::new(title)
        .x_label("reward")
        .y_label("density")
        .x_range(0.0, 1.0)
        .legend(LegendPosition::UpperRight);
    let mut tallest: f64 = 0.0;
    for (name, ty) in [
        ("open", Some(PromptType::Open)),
        ("closed", Some(PromptType::Closed)),
        ("untyped", None),
    ] {
        let values: Vec<f64> = scores
            .iter()
            .filter(|s| s.prompt_type == ty)
            .flat_map(|s| s.rewards.iter().copied())
            .collect();
        if values.is_empty() {
            continue;
        }
        let label = format!("{} ({} rewards)", type_label(name), values.len());
        let histogram = Histogram::of_values(&values, bins, (0.0, 1.0), true);
        tallest = histogram.heights.iter().cloned().fold(tallest, f64::max);
        panel = panel.histogram(
            histogram
                .label(&label)
                .color(type_color(name))
                .opacity(0.45),
        );
    }
    // From 0: the bars stand on the axis; headroom above for the legend.
    panel.y_range(0.0, 1.25 * tallest.max(1.0))
}

fn steps(records: &[MetricsRecord]) -> Vec<f64> {
    records.iter().map(|r| r.step as f64).collect()
}

fn per_step(records: &[MetricsRecord], value: impl Fn(&MetricsRecord) -> Option<f64>) -> Vec<f64> {
    records
        .iter()
        .map(|r| value(r).unwrap_or(f64::NAN))
        .collect()
}

/// The largest collapse gap any run recorded (0 without one).
pub fn largest_gap(runs: &[(String, Vec<MetricsRecord>)]) -> f64 {
    runs.iter()
        .flat_map(|(_, records)| records.iter().filter_map(|r| r.report.collapse_gap))
        .fold(0.0, f64::max)
}

/// Training curves against step: eval loss, pairwise accuracy and collapse gap. For one
/// run the accuracy panel splits open (pairwise), closed (pairwise, and long-vs-short,
/// which U = x is meant to reach while it ties inside the clusters); for several runs each
/// run is one colour and the accuracy is over all prompts.
pub fn training_curves(runs: &[(String, Vec<MetricsRecord>)]) -> Figure {
    let mut loss = Panel::new("eval loss").x_label("step").y_label("loss");
    let mut accuracy = Panel::new("pairwise accuracy")
        .x_label("step")
        .y_label("accuracy")
        .y_range(0.0, 1.02)
        .legend(LegendPosition::LowerRight);
    let mut gap = Panel::new("collapse gap")
        .x_label("step")
        .y_label("mean |open - closed|")
        .legend(LegendPosition::UpperRight);
    let single = runs.len() == 1;
    for (i, (name, records)) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let xs = steps(records);
        loss = loss.line(
            Line::new(xs.clone(), per_step(records, |r| Some(r.eval_loss)))
                .label(name)
                .color(color)
                .markers(),
        );
        if single {
            let type_stat = |ty: &'static str, f: fn(&crate::eval::TypeStats) -> f64| {
                per_step(records, move |r| r.report.for_type(ty).map(f))
            };
            accuracy = accuracy
                .line(
                    Line::new(
                        xs.clone(),
                        per_step(records, |r| Some(r.report.pairwise_accuracy)),
                    )
                    .label("all prompts")
                    .color(PALETTE[2])
                    .markers(),
                )
                .line(
                    Line::new(xs.clone(), type_stat("open", |t| t.pairwise_accuracy))
                        .label("open-ended")
                        .color(OPEN_COLOR)
                        .markers(),
                )
                .line(
                    Line::new(xs.clone(), type_stat("closed", |t| t.pairwise_accuracy))
                        .label("closed-ended")
                        .color(CLOSED_COLOR)
                        .markers(),
                )
                .line(
                    Line::new(xs.clone(), type_stat("closed", |t| t.cross_half_accuracy))
                        .label("closed long-vs-short")
                        .color(CLOSED_COLOR)
                        .dashed(),
                );
        } else {
            accuracy = accuracy.line(
                Line::new(
                    xs.clone(),
                    per_step(records, |r| Some(r.report.pairwise_accuracy)),
                )
                .label(name)
                .color(color)
                .markers(),
            );
        }
        gap = gap.line(
            Line::new(xs, per_step(records, |r| r.report.collapse_gap))
                .label(name)
                .color(color)
                .markers(),
        );
    }
    // One legend per figure is enough: the loss panel's would cover its curves.
    loss = loss.legend(LegendPosition::Hidden);
    if single {
        gap = gap.legend(LegendPosition::Hidden);
    }
    // Steps from 0, the gap from 0 so that its size reads at a glance.
    let last_step = runs
        .iter()
        .flat_map(|(_, records)| records.iter().map(|r| r.step))
        .max()
        .unwrap_or(1) as f64;
    let headroom = if single {
        1.15
    } else {
        1.0 + 0.3 * runs.len() as f64
    };
    let gap = gap.y_range(0.0, headroom * largest_gap(runs).max(0.01));
    Figure::new()
        .panel(loss.x_range(0.0, last_step))
        .panel(accuracy.x_range(0.0, last_step))
        .panel(gap.x_range(0.0, last_step))
}

/// `rcx plot`: several runs' reward panels side by side (the paper's figure), or their
/// training curves, or histograms of their rewards.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run folders written by `rcx train` (their output_dir).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long, default_value = "rcx-plot.svg")]
    pub out: PathBuf,
    /// Training curves (eval loss, pairwise accuracy, collapse gap against step) instead.
    #[arg(long, conflicts_with = "histograms")]
    pub curves: bool,
    /// Histograms of the final models' rewards per prompt type instead (scores the data).
    #[arg(long)]
    pub histograms: bool,
    /// Score the final models on this ranking file instead of reading the last evaluation
    /// of metrics.jsonl (default for --histograms: the shipped eval split).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// The loss a run was trained with, from its model notes (`rcx.json`).
pub fn run_loss(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("rcx.json")).ok()?;
    serde_json::from_str::<crate::checkpoint::ModelMeta>(&text)
        .ok()
        .map(|m| m.loss)
}

/// A run's panel title: its loss as the paper writes it, else the folder's name.
pub fn run_title(dir: &Path) -> String {
    run_loss(dir).map_or_else(|| folder_name(dir), |loss| loss_title(&loss))
}

fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map_or("run".into(), |n| n.to_string_lossy().into_owned())
}

/// Panel titles for several runs: their losses, with the folder's name beside any loss
/// that two runs share.
pub fn run_titles(dirs: &[PathBuf]) -> Vec<String> {
    let titles: Vec<String> = dirs.iter().map(|d| run_title(d)).collect();
    titles
        .iter()
        .zip(dirs)
        .map(|(title, dir)| {
            if titles.iter().filter(|t| *t == title).count() > 1 {
                format!("{title} ({})", folder_name(dir))
            } else {
                title.clone()
            }
        })
        .collect()
}

pub fn cmd_plot(args: PlotArgs) -> Result<()> {
    let titles = run_titles(&args.runs);
    let figure = if args.curves {
        let mut runs = Vec::new();
        for dir in &args.runs {
            runs.push((folder_name(dir), read_metrics(&dir.join("metrics.jsonl"))?));
        }
        training_curves(&runs)
    } else if args.histograms || args.data.is_some() {
        let data = match &args.data {
            Some(path) => path.clone(),
            None => crate::data::resolve_dataset(crate::data::SHIPPED_SET, true)
                .ok_or_else(|| Error::internal("the shipped eval split does not resolve"))?,
        };
        let mut figure = Figure::new();
        for (dir, title) in args.runs.iter().zip(&titles) {
            let scored = crate::eval::evaluate_model(dir, &data, None)?;
            figure = figure.panel(if args.histograms {
                reward_histogram_panel(title, &scored.scores, 40)
            } else {
                reward_panel(title, &scored.report)
            });
        }
        figure
    } else {
        let mut figure = Figure::new();
        for (dir, title) in args.runs.iter().zip(&titles) {
            let records = read_metrics(&dir.join("metrics.jsonl"))?;
            if let Some(last) = records.last() {
                figure = figure.panel(reward_panel(title, &last.report));
            }
        }
        figure
    };
    figure.write(&args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
