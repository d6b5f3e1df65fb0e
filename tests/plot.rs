//! The SVG writer: well-formed output, the expected elements, correct coordinates.

use rcx::plot::{Band, Figure, Histogram, LegendPosition, Line, Panel, Scatter};

/// A tiny XML well-formedness check: every tag closes in order, attribute values are
/// quoted, text holds no raw `<` or stray `&`. Returns the number of elements.
fn check_xml(svg: &str) -> usize {
    let mut stack: Vec<String> = Vec::new();
    let mut elements = 0;
    let mut rest = svg;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;"]
                    .iter()
                    .any(|e| entity.starts_with(e)),
                "stray & in text: {text}"
            );
        }
        let close = rest[open..].find('>').expect("unterminated tag") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "`<` inside a tag: {tag}");
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else {
            let name: String = tag
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '/')
                .collect();
            assert!(!name.is_empty(), "empty tag name");
            elements += 1;
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        rest = &rest[close + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert!(rest.trim().is_empty());
    elements
}

/// The paper's panel: mean reward vs response index per prompt type with a 10-90% band,
/// and the predicted optimum dashed.
fn paper_panel(title: &str) -> Panel {
    let index: Vec<f64> = (1..=8).map(f64::from).collect();
    let open = vec![0.02, 0.13, 0.27, 0.42, 0.58, 0.73, 0.87, 0.98];
    let closed = vec![0.03, 0.12, 0.26, 0.43, 0.57, 0.74, 0.88, 0.97];
    let band = |m: &[f64]| {
        Band::new(
            index.clone(),
            m.iter().map(|v| (v - 0.05).max(0.0)).collect(),
            m.iter().map(|v| (v + 0.05).min(1.0)).collect(),
        )
    };
    Panel::new(title)
        .x_label("response index")
        .y_label("reward")
        .x_range(1.0, 8.0)
        .y_range(0.0, 1.0)
        .x_ticks(index.clone())
        .band(band(&open).color("#1f77b4"))
        .band(band(&closed).color("#d62728"))
        .line(
            Line::new(index.clone(), open.clone())
                .label("open-ended")
                .color("#1f77b4")
                .markers(),
        )
        .line(
            Line::new(index.clone(), closed.clone())
                .label("closed-ended")
                .color("#d62728")
                .markers(),
        )
        .line(
            Line::new(
                index.clone(),
                vec![0.0, 0.121, 0.267, 0.421, 0.579, 0.733, 0.879, 1.0],
            )
            .label("optimum, n = 8")
            .color("black")
            .dashed(),
        )
}

#[test]
fn paper_panels_side_by_side() {
    let figure = Figure::new()
        .title("x_inv & x <runs>")
        .panel(paper_panel("U = -1/x"))
        .panel(paper_panel("U = x").legend(LegendPosition::LowerRight));
    let svg = figure.to_svg();
    check_xml(&svg);
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
    assert_eq!(svg.matches("class=\"line\"").count(), 6);
    assert_eq!(svg.matches("class=\"band\"").count(), 4);
    assert_eq!(svg.matches("class=\"marker\"").count(), 32);
    assert_eq!(svg.matches("class=\"legend\"").count(), 2);
    assert_eq!(svg.matches("stroke-dasharray").count(), 2 * 2); // the dashed line and its legend entry
    assert!(svg.contains("x_inv &amp; x &lt;runs&gt;"));
    assert_eq!(figure.width(), 840.0);
}

#[test]
fn coordinates_map_to_the_frame() {
    let figure = Figure::new().title("t").panel(Panel::new("a")).panel(
        Panel::new("b")
            .x_range(0.0, 10.0)
            .y_range(-1.0, 1.0)
            .line(Line::new(vec![0.0, 10.0], vec![-1.0, 1.0])),
    );
    let frame = figure.frame(1).unwrap();
    assert!(
        frame.left > figure.frame(0).unwrap().left + frame.width,
        "panels side by side"
    );
    // The axis minimum lands on the bottom-left corner, the maximum on the top-right one.
    assert_eq!(
        frame.to_px(0.0, -1.0),
        (frame.left, frame.top + frame.height)
    );
    assert_eq!(
        frame.to_px(10.0, 1.0),
        (frame.left + frame.width, frame.top)
    );
    let svg = figure.to_svg();
    let want = format!(
        "d=\"M{:.2},{:.2} L{:.2},{:.2}\"",
        frame.left,
        frame.top + frame.height,
        frame.left + frame.width,
        frame.top
    );
    assert!(svg.contains(&want), "{want} not in\n{svg}");
}

#[test]
fn automatic_ranges_cover_the_data() {
    let figure = Figure::new().panel(
        Panel::new("loss")
            .line(Line::new(vec![0.0, 50.0, 100.0], vec![0.7, 0.4, 0.2]))
            .scatter(Scatter::new(vec![20.0], vec![0.9])),
    );
    let frame = figure.frame(0).unwrap();
    assert_eq!(frame.x_range, (0.0, 100.0));
    assert!(frame.y_range.0 < 0.2 && frame.y_range.1 > 0.9);
    let (_, top) = frame.to_px(20.0, 0.9);
    assert!(top > frame.top && top < frame.top + frame.height);
}

#[test]
fn histograms_and_non_finite_points() {
    let values = [0.05, 0.1, 0.15, 0.5, 0.95, 1.0, f64::NAN];
    let hist = Histogram::of_values(&values, 4, (0.0, 1.0), false);
    assert_eq!(hist.heights, vec![3.0, 0.0, 1.0, 2.0]);
    let density = Histogram::of_values(&values[..6], 4, (0.0, 1.0), true);
    let mass: f64 = density.heights.iter().map(|h| h * 0.25).sum();
    assert!((mass - 1.0).abs() < 1e-12);

    let figure = Figure::new().panel(
        Panel::new("rewards")
            .histogram(hist.label("open").color("#1f77b4"))
            .histogram(
                Histogram::of_values(&[0.2, 0.8], 4, (0.0, 1.0), false)
                    .label("closed")
                    .outline(),
            )
            .line(Line::new(
                vec![0.0, 0.5, f64::NAN, 0.7, 1.0],
                vec![1.0, 2.0, 3.0, f64::INFINITY, 1.0],
            ))
            .band(Band::new(
                vec![0.0, 1.0],
                vec![0.0, f64::NAN],
                vec![1.0, 1.0],
            )),
    );
    let svg = figure.to_svg();
    check_xml(&svg);
    assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    assert_eq!(svg.matches("class=\"bar\"").count(), 8);
    // The line breaks at the non-finite points: two runs, the second a single point.
    assert_eq!(svg.matches("class=\"line\"").count(), 2);
    // A bar of height 3 from the axis at 0 reaches the top of the data range.
    let frame = figure.frame(0).unwrap();
    let (_, y3) = frame.to_px(0.0, 3.0);
    assert!(svg.contains(&format!("y=\"{y3:.2}\"")));
}

#[test]
fn empty_and_flat_panels_stay_finite() {
    let svg = Figure::new()
        .panel(Panel::new("empty"))
        .panel(Panel::new("flat").line(Line::new(vec![1.0, 1.0], vec![2.0, 2.0])))
        .to_svg();
    check_xml(&svg);
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
}

#[test]
fn write_is_atomic_and_reports_bad_paths() {
    let dir = std::env::temp_dir().join(format!("rcx-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f.svg");
    let figure = Figure::new().panel(paper_panel("p"));
    figure.write(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), figure.to_svg());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    let err = figure.write(&dir.join("missing/f.svg")).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("missing"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tick_labels_use_the_decimals_their_spacing_needs() {
    let svg = Figure::new()
        .panel(
            Panel::new("p")
                .x_range(1.0, 8.0)
                .y_range(0.0, 1.0)
                .x_ticks(vec![1.0, 2.0, 8.0]),
        )
        .to_svg();
    assert!(svg.contains(">8</text>") && !svg.contains(">8.0</text>"));
    assert!(svg.contains(">0.2</text>") && svg.contains(">1.0</text>"));
}
