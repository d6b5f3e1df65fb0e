//! results.md's section on the paper's runs on other backbones than BERT: a Llama-style
//! decoder and DeBERTa-v3's structure (`BACKBONE_RUNS`). The same measures as the BERT
//! section, and the question those runs answer: does collapse happen on these backbones
//! too, and does the prompt-aware loss prevent it?

use super::{
    COLLAPSE_GAP_MAX, Reproduction, RunResult, SEPARATION_GAP_MIN, TRAIN_SUBSET,
    completions_per_prompt, dead_model_note, eps_list, fmt_opt, gap_by_step_figure, minutes,
    names_list, optima_table, per_run_table, run_figures, setup_paragraph, summary_table,
    targets_table,
};
use crate::eval::EvalReport;
use crate::figures::{loss_title, paper_figure};
use crate::loss::LossSpec;
use crate::plot::Figure;
use std::fmt::Write as _;

/// The section's heading (without its `## `) and GitHub's anchor of it.
pub const TITLE: &str = "Other backbones: a Llama-style decoder and DeBERTa-v3";
pub const ANCHOR: &str = "other-backbones-a-llama-style-decoder-and-deberta-v3";

fn is_prompt_aware(run: &RunResult) -> bool {
    LossSpec::parse(&run.loss).is_ok_and(|s| s.is_prompt_aware())
}

/// What a collapse gap says against the bounds.
fn gap_reading(gap: Option<f64>) -> &'static str {
    match gap {
        None => "no gap (one prompt type)",
        Some(g) if g <= COLLAPSE_GAP_MAX => "types coincide: collapse",
        Some(g) if g >= SEPARATION_GAP_MIN => "types separate: no collapse",
        Some(_) => "between the bounds",
    }
}

/// A run's reading on the eval and the train prompts (once when they agree); a model that
/// gives every completion one reward reads as that, whatever its gap.
fn reading(run: &RunResult) -> String {
    if dead_model_note(run).is_some() {
        return "one reward for everything (see the note under Targets)".into();
    }
    let eval = gap_reading(run.on_eval.report.collapse_gap);
    let train = gap_reading(run.on_train.report.collapse_gap);
    if eval == train {
        eval.into()
    } else {
        format!("eval: {eval}; train: {train}")
    }
}

/// The models of the runs, in order of first appearance.
fn backbones(runs: &[RunResult]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for run in runs {
        if !out.contains(&run.model.as_str()) {
            out.push(&run.model);
        }
    }
    out
}

/// One backbone's answer, from its runs' readings: whether its single-utility runs
/// collapse and whether its prompt-aware runs keep the types apart.
fn answer(model: &str, runs: &[&RunResult]) -> String {
    let names = |group: &[&&RunResult]| {
        names_list(&group.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
    };
    let collapse = gap_reading(Some(0.0));
    let separate = gap_reading(Some(SEPARATION_GAP_MIN));
    let (single, aware): (Vec<&&RunResult>, Vec<&&RunResult>) =
        runs.iter().partition(|r| !is_prompt_aware(r));
    let mut s = format!("`{model}`: ");
    let collapsed: Vec<&&RunResult> = single
        .iter()
        .copied()
        .filter(|r| reading(r) == collapse)
        .collect();
    let other: Vec<&&RunResult> = single
        .iter()
        .copied()
        .filter(|r| reading(r) != collapse)
        .collect();
    if !collapsed.is_empty() {
        let _ = write!(
            s,
            "with one utility for every prompt the two prompt types get the same curve \
             (collapse) in {}",
            names(&collapsed)
        );
    }
    if !other.is_empty() {
        let _ = write!(
            s,
            "{}{} {} not read as collapse ({})",
            if collapsed.is_empty() { "" } else { "; " },
            names(&other),
            if other.len() == 1 { "is" } else { "are" },
            other
                .iter()
                .map(|r| format!("{}: {}", r.name, reading(r)))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if single.is_empty() {
        s += "no single-utility run";
    }
    let separated: Vec<&&RunResult> = aware
        .iter()
        .copied()
        .filter(|r| reading(r) == separate)
        .collect();
    let apart: Vec<&&RunResult> = aware
        .iter()
        .copied()
        .filter(|r| reading(r) != separate)
        .collect();
    if !separated.is_empty() {
        let _ = write!(
            s,
            "; with the prompt-aware loss the types separate in {}",
            names(&separated)
        );
    }
    if !apart.is_empty() {
        let _ = write!(
            s,
            "; with the prompt-aware loss {} does not separate them ({})",
            names(&apart),
            apart
                .iter()
                .map(|r| format!("{}: {}", r.name, reading(r)))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let verdict = match (
        !collapsed.is_empty() && other.is_empty(),
        !separated.is_empty() && apart.is_empty(),
    ) {
        (true, true) => "collapse happens on this backbone and the prompt-aware loss prevents it",
        (true, false) => {
            "collapse happens on this backbone; the prompt-aware loss does not prevent it here"
        }
        (false, true) => {
            "the prompt-aware loss separates the types; not every single-utility run collapses here"
        }
        (false, false) => "this backbone does not show the paper's picture in these runs",
    };
    if single.is_empty() || aware.is_empty() {
        s += ".";
    } else {
        let _ = write!(s, ": {verdict}.");
    }
    s
}

/// The comparison across backbones: per backbone, each run's gaps, accuracies and reading.
fn comparison(s: &mut String, runs: &[RunResult]) {
    let _ = writeln!(
        s,
        "| backbone | run | loss | collapse gap, eval | collapse gap, train | open acc | \
         closed long-vs-short | closed ties | reading |\n|---|---|---|---|---|---|---|---|---|"
    );
    for model in backbones(runs) {
        for run in runs.iter().filter(|r| r.model == model) {
            let r = &run.on_eval.report;
            let _ = writeln!(
                s,
                "| {model} | {} | {} | {} | {} | {} | {} | {} | {} |",
                run.name,
                loss_title(&run.loss),
                fmt_opt(r.collapse_gap),
                fmt_opt(run.on_train.report.collapse_gap),
                fmt_opt(r.for_type("open").map(|t| t.pairwise_accuracy)),
                fmt_opt(r.for_type("closed").map(|t| t.cross_half_accuracy)),
                fmt_opt(r.for_type("closed").map(|t| t.tie_rate)),
                reading(run)
            );
        }
    }
    let _ = writeln!(
        s,
        "\nAccuracies on the eval prompts. A gap at most {COLLAPSE_GAP_MAX} reads as collapse, \
         at least {SEPARATION_GAP_MIN} as the types kept apart (the issue's bounds).\n"
    );
    for model in backbones(runs) {
        let own: Vec<&RunResult> = runs.iter().filter(|r| r.model == model).collect();
        let _ = writeln!(s, "- {}", answer(model, &own));
    }
    s.push('\n');
}

/// The collapse gap on the eval prompts at every evaluation, one column per run.
fn gaps_by_step(s: &mut String, runs: &[RunResult]) {
    let mut steps: Vec<usize> = runs
        .iter()
        .flat_map(|r| r.metrics.iter().map(|m| m.step))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    let _ = write!(s, "| step |");
    for run in runs {
        let _ = write!(s, " {} |", run.name);
    }
    let _ = write!(s, "\n|---|{}\n", "---|".repeat(runs.len()));
    for step in steps {
        let _ = write!(s, "| {step} |");
        for run in runs {
            let gap = run
                .metrics
                .iter()
                .find(|m| m.step == step)
                .and_then(|m| m.report.collapse_gap);
            let _ = write!(s, " {} |", fmt_opt(gap));
        }
        s.push('\n');
    }
}

/// The section's figures, by file name under the figures folder: the runs side by side on
/// the eval and on the train prompts, every run's gap across training, each run's own.
pub fn figure_files(runs: &[RunResult]) -> Vec<(String, Figure)> {
    if runs.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (split, on_train) in [("eval", false), ("train", true)] {
        let panels: Vec<(String, &EvalReport)> = runs
            .iter()
            .map(|r| {
                let scored = if on_train { &r.on_train } else { &r.on_eval };
                (
                    format!("{}: {}", r.model, loss_title(&r.loss)),
                    &scored.report,
                )
            })
            .collect();
        let title = format!("{split} prompts: mean reward by response index");
        out.push((
            format!("backbones_figure_{split}.svg"),
            paper_figure(Some(&title), &panels),
        ));
    }
    let all: Vec<&RunResult> = runs.iter().collect();
    out.push((
        "backbones_gap_by_step.svg".into(),
        gap_by_step_figure(&all, None),
    ));
    for run in runs {
        out.extend(run_figures(run));
    }
    out
}

/// The text of the section.
pub fn backbones_markdown(r: &Reproduction) -> String {
    let fig = |name: &str| format!("{}/{name}", r.figures_dir);
    let runs = &r.runs;
    let names: Vec<&str> = runs.iter().map(|run| run.name.as_str()).collect();
    let mut s = format!("## {TITLE}\n\n");
    let _ = write!(
        s,
        "Does reward collapse happen in a decoder reward model and in DeBERTa-v3's structure \
         too, and does the prompt-aware loss prevent it? This section trains {} on the same \
         data as the BERT runs, then scores every final model on the eval split and on the \
         first {TRAIN_SUBSET} training prompts with the same measures, and compares the mean \
         reward at each response index with the theory's optimum for n = {}. Every number \
         below is computed from these runs.\n\n",
        names_list(&names),
        completions_per_prompt(runs).map_or("-".into(), |k| k.to_string())
    );
    let _ = writeln!(s, "Made by `{}`.\n", r.command);
    let _ = write!(
        s,
        "Total wall time: **{}**; {}.",
        minutes(r.total_wall_s),
        r.machine
    );
    let reused: Vec<&RunResult> = runs.iter().filter(|run| run.reused).collect();
    if !reused.is_empty() {
        let _ = write!(
            s,
            " {} of the runs were trained earlier and reused (`--reuse`, each matching its \
             config and data by the SHA-256 its rcx.json records): their {} of training are \
             not in that total. Training these runs took {} and scoring them {}: a fresh \
             `rcx reproduce --only {}` takes about the sum.",
            reused.len(),
            minutes(reused.iter().map(|run| run.train_wall_s).sum()),
            minutes(runs.iter().map(|run| run.train_wall_s).sum()),
            minutes(runs.iter().map(|run| run.eval_wall_s).sum()),
            names.join(",")
        );
    }
    s += "\n\n";
    s += &setup_paragraph(runs, &[]);
    let _ = writeln!(
        s,
        "Distances and optima as in the BERT section: the optimum of the extended utility \
         that training maximises (shifted by the run's eps: {}) judges the targets, the pure \
         form (eps = 0) is in the notes.\n",
        eps_list(runs)
    );
    for (name, why) in &r.skipped {
        let _ = writeln!(s, "Skipped `{name}`: {why}\n");
    }

    s += "### Does collapse happen on these backbones, and does the prompt-aware loss prevent \
          it?\n\n";
    comparison(&mut s, runs);

    s += "### Targets (issue 5's, on these backbones)\n\n";
    targets_table(&mut s, runs);

    s += "### Per run\n\nWall time is training (from its start to the last evaluation) and, \
          after it, scoring the eval split and the training subset.\n\n";
    per_run_table(&mut s, runs);
    s += "\nOn the eval prompts (the held-out split):\n\n";
    summary_table(&mut s, runs, false);
    let _ = write!(
        s,
        "\nOn the training prompts (the first {TRAIN_SUBSET} of the training file):\n\n"
    );
    summary_table(&mut s, runs, true);

    s += "\n### The collapse gap across training (eval prompts)\n\n";
    gaps_by_step(&mut s, runs);
    let _ = writeln!(
        s,
        "\n![collapse gap by step, other backbones]({})\n\nThe dashed lines are the bounds \
         {COLLAPSE_GAP_MAX} and {SEPARATION_GAP_MIN}.\n",
        fig("backbones_gap_by_step.svg")
    );

    let _ = writeln!(
        s,
        "### The theory's optima for n = {} beside the measured means (eval prompts)",
        completions_per_prompt(runs).map_or("-".into(), |k| k.to_string())
    );
    for run in runs {
        optima_table(&mut s, run);
    }

    let _ = writeln!(
        s,
        "\n### Figures\n\n![other backbones, eval prompts]({})\n\n![other backbones, train \
         prompts]({})\n\nEach panel: mean reward against response index (1 = worst), \
         open-ended prompts in blue, closed-ended in red, shaded between the 10th and 90th \
         percentiles, the optimum of the trained utility dashed. Then each run: its panels \
         (eval prompts, train prompts, the histogram of every reward) and its training \
         curves.\n",
        fig("backbones_figure_eval.svg"),
        fig("backbones_figure_train.svg")
    );
    for run in runs {
        let _ = writeln!(
            s,
            "#### {}\n\n![{} panels]({})\n\n![{} curves]({})\n",
            run.name,
            run.name,
            fig(&format!("{}_panels.svg", run.name)),
            run.name,
            fig(&format!("{}_curves.svg", run.name))
        );
    }
    s
}
