//! Pure SVG drawing: time-series charts and shields-style badges, shared by
//! `/charts/...`, `/badge/...` and the web pages (DESIGN.md §4.3, §6).
//!
//! No JavaScript is needed to read them: axes, units and gaps are drawn by the service,
//! and every point carries a `<title>` the browser shows on hover.

use std::fmt::Write;

use mcp_metrics_core::period::Period;
use mcp_metrics_core::time::format_rfc3339_ms;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Line,
    Bars,
}

#[derive(Debug, Clone)]
pub struct ChartSeries {
    pub label: String,
    pub color: &'static str,
    pub style: Style,
    pub values: Vec<Option<f64>>,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub unit: Option<String>,
    /// The span shown; it sets the time-axis ticks.
    pub period: Period,
    /// Width of one point in ms (usually the period's resolution).
    pub resolution_ms: i64,
    /// Start of each point, unix ms.
    pub t: Vec<i64>,
    pub series: Vec<ChartSeries>,
    pub width: u32,
    pub height: u32,
}

const LEFT: f64 = 64.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 30.0;

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A value with its unit, compact: `1.2 s`, `340 ms`, `12.5k`.
pub fn format_value(v: f64, unit: Option<&str>) -> String {
    let trim = |x: f64, digits: usize| {
        let s = format!("{x:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    match unit {
        Some("ms") if v.abs() >= 1000.0 => format!("{} s", trim(v / 1000.0, 2)),
        Some("ms") => format!("{} ms", trim(v, if v.abs() < 10.0 { 2 } else { 0 })),
        Some(u) => format!("{} {u}", trim(v, 2)),
        None if v.abs() >= 1e6 => format!("{}M", trim(v / 1e6, 1)),
        None if v.abs() >= 1e4 => format!("{}k", trim(v / 1e3, 1)),
        None => trim(v, 2),
    }
}

/// "Nice" axis ticks (1, 2, 5 × 10^k) covering [lo, hi].
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo, lo + 1.0) };
    let range = hi - lo;
    let magnitude = 10f64.powf((range / target.max(1) as f64).log10().floor());
    // The finest 1-2-5 step that gives at most one tick more than asked for.
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| range / s <= (target + 1) as f64)
        .unwrap_or(10.0 * magnitude);
    let start = (lo / step).floor() * step;
    // Ticks by index, a bounded number of them: adding a step too small to change a
    // huge value must not loop, and extreme inputs still get an axis.
    let count = ((hi - start) / step).ceil();
    if !step.is_finite() || step <= 0.0 || !count.is_finite() || !(0.0..=64.0).contains(&count) || start + step == start
    {
        return vec![lo, hi];
    }
    (0..=count as usize)
        .map(|k| start + k as f64 * step)
        .map(|v| if v.abs() < step * 1e-9 { 0.0 } else { v })
        .collect()
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Time-axis ticks for a period: (instant, label), at readable round instants.
pub fn time_ticks(period: Period, from: i64, to: i64) -> Vec<(i64, String)> {
    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    const DAY: i64 = 24 * HOUR;
    let (step, day_labels) = match period {
        Period::H1 => (10 * MIN, false),
        Period::H6 => (HOUR, false),
        Period::H24 => (3 * HOUR, false),
        Period::D7 => (DAY, true),
        Period::D30 => (5 * DAY, true),
        Period::D90 => (15 * DAY, true),
        Period::Y1 => (30 * DAY, true),
    };
    let mut ticks = Vec::new();
    let mut t = (from + step - 1).div_euclid(step) * step;
    while t < to {
        let text = format_rfc3339_ms(t);
        let (month, day, hm) = (&text[5..7], &text[8..10], &text[11..16]);
        let label = if day_labels {
            let m: usize = month.parse().unwrap_or(1);
            format!("{} {}", MONTHS[(m + 11) % 12], day.trim_start_matches('0'))
        } else {
            hm.to_owned()
        };
        ticks.push((t, label));
        t += step;
    }
    ticks
}

/// A point's time in its tooltip, as short as the period allows: `21:05` within a
/// day, `Dec 4 21:00` within a month, `Dec 4` beyond.
fn point_label(t: i64, period: Period) -> String {
    let text = format_rfc3339_ms(t);
    let month: usize = text[5..7].parse().unwrap_or(1);
    let day = text[8..10].trim_start_matches('0');
    match period {
        Period::H1 | Period::H6 | Period::H24 => text[11..16].to_owned(),
        Period::D7 | Period::D30 => format!("{} {day} {}", MONTHS[(month + 11) % 12], &text[11..16]),
        Period::D90 | Period::Y1 => format!("{} {day}", MONTHS[(month + 11) % 12]),
    }
}

/// Draws a chart. Nulls are gaps; a chart without values says so.
pub fn render_chart(chart: &Chart) -> String {
    // A non-finite value (an overflowed sum, say) cannot be drawn: it is a gap.
    let cleaned;
    let chart = if chart
        .series
        .iter()
        .any(|s| s.values.iter().flatten().any(|v| !v.is_finite()))
    {
        let mut c = chart.clone();
        for s in &mut c.series {
            for v in &mut s.values {
                *v = v.filter(|x| x.is_finite());
            }
        }
        cleaned = c;
        &cleaned
    } else {
        chart
    };
    let (w, h) = (f64::from(chart.width), f64::from(chart.height));
    let (plot_w, plot_h) = (w - LEFT - RIGHT, h - TOP - BOTTOM);
    let n = chart.t.len().max(1);
    let step = chart.resolution_ms;
    let from = chart.t.first().copied().unwrap_or(0);
    let to = from + n as i64 * step;
    let x_of = |t: i64| LEFT + (t - from) as f64 / (to - from).max(1) as f64 * plot_w;
    let values = chart.series.iter().flat_map(|s| s.values.iter().flatten().copied());
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let empty = !lo.is_finite();
    let unit = chart.unit.as_deref();
    let label = escape(&chart.title);
    let mut svg = String::with_capacity(8 * 1024);
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{label}" class="chart" font-family="system-ui,-apple-system,Segoe UI,Roboto,sans-serif" font-size="11"><title>{label}</title><rect width="{w}" height="{h}" fill="#ffffff" rx="6"/><text x="{LEFT}" y="18" font-size="13" font-weight="600" fill="#111827">{label}</text>"##
    );
    // Legend, right-aligned.
    let mut lx = w - RIGHT;
    for s in chart.series.iter().rev() {
        let text_w = text_width(&s.label, 11.0);
        lx -= text_w + 22.0;
        let _ = write!(
            svg,
            r##"<g class="legend"><rect x="{lx:.1}" y="10" width="10" height="10" rx="2" fill="{}"/><text x="{:.1}" y="19" fill="#374151">{}</text></g>"##,
            s.color,
            lx + 14.0,
            escape(&s.label)
        );
    }
    let base = TOP + plot_h;
    // Time axis.
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" y1="{base}" x2="{:.1}" y2="{base}" stroke="#9ca3af"/>"##,
        LEFT + plot_w
    );
    for (t, text) in time_ticks(chart.period, from, to) {
        let x = x_of(t);
        let _ = write!(
            svg,
            r##"<line class="tick-x" x1="{x:.1}" y1="{base}" x2="{x:.1}" y2="{:.1}" stroke="#9ca3af"/><text class="tick-x-label" x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#4b5563">{}</text>"##,
            base + 4.0,
            base + 16.0,
            escape(&text)
        );
    }
    if empty {
        let _ = write!(
            svg,
            r##"<text class="empty" x="{:.1}" y="{:.1}" text-anchor="middle" fill="#6b7280" font-size="13">No data for this period</text></svg>"##,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
        return svg;
    }
    let bars = chart.series.iter().any(|s| s.style == Style::Bars);
    if bars || lo > 0.0 {
        lo = lo.min(0.0);
    }
    let ticks = nice_ticks(lo, hi, 4);
    let (axis_lo, axis_hi) = (ticks[0], *ticks.last().unwrap_or(&hi));
    let y_of = |v: f64| base - (v - axis_lo) / (axis_hi - axis_lo).max(f64::MIN_POSITIVE) * plot_h;
    for v in &ticks {
        let y = y_of(*v);
        let _ = write!(
            svg,
            r##"<line class="tick-y" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e7eb"/><text class="tick-y-label" x="{:.1}" y="{:.1}" text-anchor="end" fill="#4b5563">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            escape(&format_value(*v, unit))
        );
    }
    let slot = plot_w / n as f64;
    for (si, s) in chart.series.iter().enumerate() {
        let _ = write!(
            svg,
            r##"<g class="series" data-series="{}" fill="{}">"##,
            escape(&s.label),
            s.color
        );
        match s.style {
            Style::Bars => {
                // Each bar carries its own tooltip.
                let bar_w = (slot * 0.8 / chart.series.len() as f64).max(0.5);
                for (i, v) in s.values.iter().enumerate() {
                    let Some(v) = v else { continue };
                    let x = x_of(chart.t[i]) + slot * 0.1 + bar_w * si as f64;
                    let (y0, y1) = (y_of(0.0), y_of(*v));
                    let _ = write!(
                        svg,
                        r##"<rect class="pt" x="{x:.1}" y="{:.0}" width="{bar_w:.1}" height="{:.0}"><title>{} {}: {}</title></rect>"##,
                        y1.min(y0),
                        (y0 - y1).abs().max(0.5),
                        point_label(chart.t[i], chart.period),
                        escape(&s.label),
                        escape(&format_value(*v, unit))
                    );
                }
            }
            Style::Line => {
                // One path; a gap (null) starts a new segment. A point with no
                // neighbour draws no line, so it is shown as a dot.
                let mut d = String::new();
                let mut dots = String::new();
                let mut pen_down = false;
                for (i, v) in s.values.iter().enumerate() {
                    match v {
                        Some(v) => {
                            let (x, y) = (x_of(chart.t[i]) + slot / 2.0, y_of(*v));
                            let _ = write!(d, "{}{x:.1},{y:.1}", if pen_down { " L" } else { " M" });
                            pen_down = true;
                            if s.values.get(i + 1).is_none_or(|next| next.is_none())
                                && (i == 0 || s.values[i - 1].is_none())
                            {
                                let _ = write!(
                                    dots,
                                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{}"/>"##,
                                    s.color
                                );
                            }
                        }
                        None => pen_down = false,
                    }
                }
                let _ = write!(
                    svg,
                    r##"<path d="{}" fill="none" stroke="{}" stroke-width="1.8" stroke-linejoin="round"/>{dots}"##,
                    d.trim(),
                    s.color
                );
            }
        }
        svg.push_str("</g>");
    }
    // Line charts: one hover target per point in time, whose tooltip lists every line,
    // so the markup grows with points, not points × lines.
    let lines: Vec<&ChartSeries> = chart.series.iter().filter(|s| s.style == Style::Line).collect();
    if !lines.is_empty() {
        // y and height come from CSS (SVG 2 geometry properties): written once, not per point.
        let _ = write!(
            svg,
            r##"<style>.hover rect{{y:{TOP}px;height:{plot_h:.0}px}}</style><g class="hover" fill="transparent">"##
        );
        for i in 0..n.min(chart.t.len()) {
            let parts: Vec<String> = lines
                .iter()
                .filter_map(|s| {
                    s.values
                        .get(i)
                        .copied()
                        .flatten()
                        .map(|v| format!("{} {}", escape(&s.label), escape(&format_value(v, unit))))
                })
                .collect();
            if parts.is_empty() {
                continue;
            }
            let _ = write!(
                svg,
                r##"<rect class="pt" x="{:.1}" width="{slot:.1}"><title>{}: {}</title></rect>"##,
                x_of(chart.t[i]),
                point_label(chart.t[i], chart.period),
                parts.join(", ")
            );
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg
}

/// A small line without axes for directory cards; gaps stay gaps.
pub fn render_sparkline(values: &[Option<f64>], color: &str) -> String {
    let (w, h) = (240.0, 40.0);
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    if present.is_empty() {
        return format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" role="img" aria-label="no data"><text x="4" y="24" fill="#9ca3af" font-size="11" font-family="system-ui,sans-serif">no latency data yet</text></svg>"##
        );
    }
    let hi = present.iter().copied().fold(f64::MIN, f64::max).max(f64::MIN_POSITIVE);
    let n = values.len().max(2) as f64 - 1.0;
    let mut d = String::new();
    let mut pen_down = false;
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => {
                let (x, y) = (i as f64 / n * (w - 4.0) + 2.0, h - 3.0 - v / hi * (h - 6.0));
                let _ = write!(d, "{}{x:.1},{y:.1}", if pen_down { " L" } else { " M" });
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    // Points without a neighbour have no line to show them: mark them.
    let mut dots = String::new();
    for (i, v) in values.iter().enumerate() {
        let lonely = (i == 0 || values[i - 1].is_none()) && values.get(i + 1).is_none_or(|n| n.is_none());
        if let (Some(v), true) = (v, lonely) {
            let (x, y) = (i as f64 / n * (w - 4.0) + 2.0, h - 3.0 - v / hi * (h - 6.0));
            let _ = write!(dots, r#"<circle cx="{x:.1}" cy="{y:.1}" r="2" fill="{color}"/>"#);
        }
    }
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" preserveAspectRatio="none" role="img" aria-label="trend"><path d="{}" fill="none" stroke="{color}" stroke-width="1.5"/>{dots}</svg>"##,
        d.trim()
    )
}

/// Width of `text` in Verdana-like sans at `size` px, from per-character advances
/// (shields.io measures the same way), so badge and legend text never overflows.
pub fn text_width(text: &str, size: f64) -> f64 {
    let em: f64 = text
        .chars()
        .map(|c| match c {
            'i' | 'l' | 'j' | '\'' | '|' | '.' | ',' | ':' | ';' | '!' => 0.32,
            'f' | 't' | 'r' | 'I' | ' ' | '(' | ')' | '[' | ']' | '-' => 0.42,
            'm' | 'w' | 'M' | 'W' | '%' | '@' => 0.95,
            'A'..='Z' | '0'..='9' | '#' | '$' | '&' => 0.66,
            c if c.is_ascii() => 0.6,
            _ => 0.8,
        })
        .sum();
    em * size
}

/// A shields-style badge: grey label, coloured value.
pub fn render_badge(label: &str, value: &str, color: &str) -> String {
    let pad = 6.0;
    let lw = (text_width(label, 11.0) + 2.0 * pad).ceil();
    let vw = (text_width(value, 11.0) + 2.0 * pad).ceil();
    let total = lw + vw;
    let (label, value) = (escape(label), escape(value));
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" aria-label="{label}: {value}"><title>{label}: {value}</title><linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient><clipPath id="r"><rect width="{total}" height="20" rx="3" fill="#fff"/></clipPath><g clip-path="url(#r)"><rect class="label" width="{lw}" height="20" fill="#555"/><rect class="value" x="{lw}" width="{vw}" height="20" fill="{color}"/><rect width="{total}" height="20" fill="url(#s)"/></g><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11"><text x="{:.1}" y="14">{label}</text><text x="{:.1}" y="14">{value}</text></g></svg>"##,
        lw / 2.0,
        lw + vw / 2.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(period: Period, values: Vec<Option<f64>>, style: Style) -> Chart {
        let (from, _) = period.window(1_750_000_000_000);
        let t: Vec<i64> = (0..period.points())
            .map(|i| from + i * period.resolution_ms())
            .collect();
        Chart {
            title: "Latency <p95> & co".into(),
            unit: Some("ms".into()),
            period,
            resolution_ms: period.resolution_ms(),
            t,
            series: vec![ChartSeries {
                label: "p95".into(),
                color: "#f59e0b",
                style,
                values,
            }],
            width: 640,
            height: 240,
        }
    }

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed XML: {e}\n{svg}"))
    }

    fn count(doc: &roxmltree::Document, class: &str) -> usize {
        doc.descendants()
            .filter(|n| n.attribute("class") == Some(class))
            .count()
    }

    #[test]
    fn every_period_draws_its_points_axes_and_ticks() {
        let expected_x_ticks = [
            (Period::H1, 6),
            (Period::H6, 6),
            (Period::H24, 8),
            (Period::D7, 7),
            (Period::D30, 6),
            (Period::D90, 6),
            (Period::Y1, 12),
        ];
        for (period, ticks) in expected_x_ticks {
            let n = period.points() as usize;
            // Every third point missing: gaps.
            let values: Vec<Option<f64>> = (0..n).map(|i| (i % 3 != 0).then_some(10.0 + i as f64)).collect();
            let present = values.iter().flatten().count();
            let svg = render_chart(&chart(period, values, Style::Line));
            let doc = parse(&svg);
            assert_eq!(count(&doc, "pt"), present, "{period:?} points");
            let x_ticks = count(&doc, "tick-x");
            assert!(
                (ticks..=ticks + 1).contains(&x_ticks),
                "{period:?}: {x_ticks} time ticks"
            );
            assert!(count(&doc, "tick-y") >= 3, "{period:?} value ticks");
            let path = doc.descendants().find(|n| n.tag_name().name() == "path").unwrap();
            let segments = path.attribute("d").unwrap().matches('M').count();
            assert_eq!(segments, (n + 1) / 3, "{period:?}: every gap breaks the line");
            assert!(svg.contains("Latency &lt;p95&gt; &amp; co"));
        }
    }

    #[test]
    fn bars_units_and_empty_state() {
        let svg = render_chart(&chart(Period::H24, vec![Some(1200.0); 288], Style::Bars));
        let doc = parse(&svg);
        assert_eq!(count(&doc, "pt"), 288);
        assert!(
            svg.contains(">1.2 s: ") || svg.contains(": 1.2 s<"),
            "unit formatting in tooltips"
        );
        let empty = render_chart(&chart(Period::D7, vec![None; 168], Style::Line));
        let doc = parse(&empty);
        assert_eq!(count(&doc, "empty"), 1);
        assert_eq!(count(&doc, "pt"), 0);
        assert_eq!(count(&doc, "tick-x"), 7, "axes are drawn even when empty");
    }

    #[test]
    fn value_formatting_and_ticks() {
        assert_eq!(format_value(1234.0, Some("ms")), "1.23 s");
        assert_eq!(format_value(87.4, Some("ms")), "87 ms");
        assert_eq!(format_value(2.5, Some("ms")), "2.5 ms");
        assert_eq!(format_value(15300.0, None), "15.3k");
        assert_eq!(nice_ticks(0.0, 97.0, 4), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(nice_ticks(0.0, 0.0, 4).first(), Some(&0.0));
        // Huge values a few units of precision apart, and huge constants: an axis, no hang.
        assert_eq!(nice_ticks(-1e20, -1e20 + 16384.0, 4).len(), 2);
        assert!(!nice_ticks(-1e17, -1e17, 4).is_empty());
        assert!(!nice_ticks(f64::MIN, f64::MAX, 4).is_empty());
        let mut c = chart(
            Period::H1,
            vec![Some(f64::INFINITY), Some(-1e17), Some(-1e17)],
            Style::Line,
        );
        c.series[0].values.resize(60, None);
        roxmltree::Document::parse(&render_chart(&c)).unwrap();
    }

    #[test]
    fn badges_fit_their_text() {
        for (label, value) in [
            ("latency", "120 ms"),
            ("installs", "12.5k"),
            ("status", "unknown"),
            ("uptime", "99.95%"),
        ] {
            let svg = render_badge(label, value, "#4c1");
            let doc = parse(&svg);
            let rect = |class: &str| -> f64 {
                doc.descendants()
                    .find(|n| n.attribute("class") == Some(class))
                    .unwrap()
                    .attribute("width")
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            assert!(rect("label") >= text_width(label, 11.0) + 10.0);
            assert!(rect("value") >= text_width(value, 11.0) + 10.0);
        }
        assert!(text_width("WWW", 11.0) > text_width("iii", 11.0));
    }
}
