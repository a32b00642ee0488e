//! A TTFT chart a person can open in a browser: per run, the percentile curve (x in
//! "nines", so the tail gets as much room as the median) and a histogram on a log time axis.
//!
//! Hand-written SVG: a few rectangles, lines and one polyline per panel, so there is no
//! charting dependency and the file is readable as text.

use std::fmt::Write as _;

use crate::histogram::Histogram;

const WIDTH: f64 = 1000.0;
const ROW: f64 = 330.0;
/// Inner plot area of a panel: left/right margins leave room for the axis labels.
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 230.0;
const LEFT_X: f64 = 70.0;
const RIGHT_X: f64 = 570.0;
const TOP: f64 = 62.0;

/// One run's row of the chart.
#[derive(Debug)]
pub struct Series<'a> {
    /// Bold heading, e.g. "A: latency under load".
    pub title: String,
    /// The line below it: what exactly was run.
    pub subtitle: String,
    /// The run's TTFTs.
    pub ttft: &'a Histogram,
}

/// The chart for `runs`, one row each.
pub fn chart(runs: &[Series<'_>]) -> String {
    let height = ROW * runs.len().max(1) as f64 + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    if runs.is_empty() {
        let _ = writeln!(s, r#"<text x="20" y="30">no runs</text>"#);
    }
    for (i, run) in runs.iter().enumerate() {
        let y0 = ROW * i as f64;
        let h = run.ttft;
        let _ = writeln!(
            s,
            r#"<text x="20" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
            y0 + 18.0,
            escape(&run.title)
        );
        let _ = writeln!(
            s,
            r##"<text x="20" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
            y0 + 33.0,
            escape(&run.subtitle)
        );
        if h.count() == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{LEFT_X}" y="{:.1}">no TTFT samples</text>"#,
                y0 + TOP + 20.0
            );
            continue;
        }
        percentile_panel(&mut s, h, LEFT_X, y0 + TOP);
        histogram_panel(&mut s, h, RIGHT_X, y0 + TOP);
    }
    s.push_str("</svg>\n");
    s
}

/// TTFT against percentile, x = -log10(1 - q): 0 is the minimum, 1 is p90, 3 is p99.9.
fn percentile_panel(s: &mut String, h: &Histogram, x0: f64, y0: f64) {
    let count = h.count() as f64;
    // As many nines as the sample count supports: p99.9 needs about a thousand samples.
    let nines = count.log10().floor().clamp(1.0, 5.0);
    let steps = 200;
    let points: Vec<(f64, u64)> = (0..=steps)
        .map(|i| {
            let x = nines * f64::from(i) / f64::from(steps);
            let q = 1.0 - 10f64.powf(-x);
            (x, h.quantile(q).unwrap_or(0))
        })
        .collect();
    let top = points.iter().map(|p| p.1).max().unwrap_or(0).max(1);
    let (y_max, y_step) = nice_axis(top as f64);

    frame(s, x0, y0, "TTFT by percentile", "percentile", "TTFT");
    for (x, label) in [
        (0.0, "0%"),
        (2f64.log10(), "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "99.999%"),
    ] {
        if x <= nines {
            let px = x0 + x / nines * PANEL_W;
            x_tick(s, px, y0, label);
        }
    }
    y_ticks(s, x0, y0, y_max, y_step, fmt_axis_ns);
    let mut line = String::new();
    for (x, v) in &points {
        let px = x0 + x / nines * PANEL_W;
        let py = y0 + PANEL_H - (*v as f64 / y_max) * PANEL_H;
        let _ = write!(line, "{px:.1},{py:.1} ");
    }
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
        line.trim_end()
    );
}

/// Share of answers per TTFT bin, ten bins per decade of time.
fn histogram_panel(s: &mut String, h: &Histogram, x0: f64, y0: f64) {
    let min = h.min().unwrap_or(1).max(1) as f64;
    let max = h.max().unwrap_or(1).max(1) as f64;
    let lo_decade = min.log10().floor();
    let mut hi_decade = max.log10().ceil();
    if hi_decade <= lo_decade {
        hi_decade = lo_decade + 1.0;
    }
    let per_decade = 10.0;
    let bins = ((hi_decade - lo_decade) * per_decade) as usize;
    let mut counts = vec![0u64; bins];
    for (lo, hi, c) in h.buckets() {
        let mid = ((lo as f64 + hi as f64) / 2.0).max(1.0);
        let bin = ((mid.log10() - lo_decade) * per_decade).floor();
        let bin = (bin.max(0.0) as usize).min(bins - 1);
        counts[bin] += c;
    }
    let total = h.count() as f64;
    let top = counts.iter().copied().max().unwrap_or(0) as f64 / total * 100.0;
    // Headroom, so the tallest bar does not touch the frame.
    let (y_max, y_step) = nice_axis((top * 1.05).max(1e-9));

    frame(
        s,
        x0,
        y0,
        "TTFT histogram",
        "TTFT (log scale)",
        "% of answers",
    );
    let decades = hi_decade - lo_decade;
    let mut d = lo_decade;
    while d <= hi_decade + 1e-9 {
        let px = x0 + (d - lo_decade) / decades * PANEL_W;
        x_tick(s, px, y0, &fmt_axis_ns(10f64.powf(d)));
        d += 1.0;
    }
    y_ticks(s, x0, y0, y_max, y_step, |v| format!("{v:.0}%"));
    let bar_w = PANEL_W / bins as f64;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let share = c as f64 / total * 100.0;
        let bh = share / y_max * PANEL_H;
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4c78a8"><title>{:.2}% of answers</title></rect>"##,
            x0 + i as f64 * bar_w + 0.5,
            y0 + PANEL_H - bh,
            (bar_w - 1.0).max(0.5),
            bh,
            share
        );
    }
}

/// A panel's axes box, title and axis names.
fn frame(s: &mut String, x0: f64, y0: f64, title: &str, x_name: &str, y_name: &str) {
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        x0 + PANEL_W / 2.0,
        y0 - 8.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
        x0 + PANEL_W / 2.0,
        y0 + PANEL_H + 34.0,
        escape(x_name)
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555" transform="rotate(-90 {:.1} {:.1})">{}</text>"##,
        x0 - 52.0,
        y0 + PANEL_H / 2.0,
        x0 - 52.0,
        y0 + PANEL_H / 2.0,
        escape(y_name)
    );
}

fn x_tick(s: &mut String, px: f64, y0: f64, label: &str) {
    let _ = writeln!(
        s,
        r##"<line x1="{px:.1}" y1="{y0:.1}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
        y0 + PANEL_H,
        y0 + PANEL_H + 16.0,
        escape(label)
    );
}

fn y_ticks(s: &mut String, x0: f64, y0: f64, y_max: f64, step: f64, label: impl Fn(f64) -> String) {
    let mut v = 0.0;
    while v <= y_max * (1.0 + 1e-9) {
        let py = y0 + PANEL_H - v / y_max * PANEL_H;
        let _ = writeln!(
            s,
            r##"<line x1="{x0:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + PANEL_W,
            x0 - 6.0,
            py + 4.0,
            escape(&label(v))
        );
        v += step;
    }
}

/// An axis from 0 to a round number at or above `top`, with its round tick step.
fn nice_axis(top: f64) -> (f64, f64) {
    let raw = top / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&st| st >= raw)
        .unwrap_or(10.0 * mag);
    ((top / step).ceil().max(1.0) * step, step)
}

/// Nanoseconds as a short axis label.
fn fmt_axis_ns(ns: f64) -> String {
    let trim = |v: f64| {
        let t = format!("{v:.2}");
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    if ns == 0.0 {
        "0".into()
    } else if ns < 1e3 {
        format!("{}ns", trim(ns))
    } else if ns < 1e6 {
        format!("{}µs", trim(ns / 1e3))
    } else if ns < 1e9 {
        format!("{}ms", trim(ns / 1e6))
    } else {
        format!("{}s", trim(ns / 1e9))
    }
}

/// Escapes text for an SVG text node or attribute.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that every tag is closed in order (a small XML well-formedness check: tags,
    /// self-closing tags, attribute quotes; enough for what `chart` writes).
    fn assert_well_formed(svg: &str) {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in <{tag}>"
            );
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap();
                stack.push(name);
            }
            let text = &rest[..open];
            assert!(!text.contains('>'), "stray '>' in text {text:?}");
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "non-finite number"
        );
    }

    #[test]
    fn chart_is_well_formed() {
        let mut h = Histogram::new();
        for i in 1..5000u64 {
            h.record(100_000 + i * i * 7);
        }
        let empty = Histogram::new();
        let mut one = Histogram::new();
        one.record(42_000);
        let series = |title: &str, ttft| Series {
            title: title.into(),
            subtitle: "closed loop, 1000 concurrent".into(),
            ttft,
        };
        let svg = chart(&[
            series("A: <latency> & \"tails\"", &h),
            series("empty", &empty),
            series("one", &one),
        ]);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        assert!(svg.contains("A: &lt;latency&gt; &amp; &quot;tails&quot;"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("99.9%"));
        assert!(svg.contains("no TTFT samples"));
        assert_well_formed(&svg);
        assert_well_formed(&chart(&[]));
    }

    #[test]
    fn nice_axes() {
        assert_eq!(nice_axis(9.3), (10.0, 2.0));
        assert_eq!(nice_axis(1.0), (1.0, 0.2));
        let (max, step) = nice_axis(1_234_567.0);
        assert!(max >= 1_234_567.0 && step > 0.0);
        assert_eq!(fmt_axis_ns(1e6), "1ms");
        assert_eq!(fmt_axis_ns(2.5e5), "250µs");
    }
}
