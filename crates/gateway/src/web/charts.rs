//! Bar charts as inline SVG, drawn on the server: no script, no front-end
//! build. Each chart has a `<title>` and `<desc>` for screen readers, and the
//! pages put a table with the same numbers next to it.

use super::html::esc;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 160;
const AXIS: u32 = 18;

/// A bar chart of `bars` (label, value); values below zero count as zero.
/// `show` formats a value for the bar's tooltip and the summary.
pub fn bar_chart(id: &str, title: &str, bars: &[(String, i64)], show: impl Fn(i64) -> String) -> String {
    let max = bars.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let total: i64 = bars.iter().map(|(_, v)| (*v).max(0)).sum();
    let desc = match (bars.first(), bars.last()) {
        (Some((first, _)), Some((last, _))) => format!(
            "{} bars from {} to {}; highest {}, total {}. The table below has every value.",
            bars.len(),
            first,
            last,
            show(max),
            show(total)
        ),
        _ => "No data yet.".to_string(),
    };
    let id = esc(id);
    let mut svg = format!(
        "<figure><svg class=\"chart\" role=\"img\" aria-labelledby=\"{id}-t {id}-d\" viewBox=\"0 0 {WIDTH} {h}\" \
         width=\"100%\" preserveAspectRatio=\"none\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title id=\"{id}-t\">{t}</title><desc id=\"{id}-d\">{d}</desc>\
         <line x1=\"0\" y1=\"{HEIGHT}\" x2=\"{WIDTH}\" y2=\"{HEIGHT}\" stroke=\"currentColor\" stroke-width=\"1\"/>",
        h = HEIGHT + AXIS,
        t = esc(title),
        d = esc(&desc),
    );
    if !bars.is_empty() {
        let slot = f64::from(WIDTH) / bars.len() as f64;
        let bar_w = (slot * 0.8).max(1.0);
        for (i, (label, value)) in bars.iter().enumerate() {
            let h = (*value).max(0) as f64 / max as f64 * f64::from(HEIGHT - 4);
            let x = i as f64 * slot + (slot - bar_w) / 2.0;
            svg.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{h:.1}\" class=\"bar\"><title>{l}: {v}</title></rect>",
                y = f64::from(HEIGHT) - h,
                l = esc(label),
                v = esc(&show(*value)),
            ));
        }
        // First and last labels under the axis.
        if let (Some((first, _)), Some((last, _))) = (bars.first(), bars.last()) {
            svg.push_str(&format!(
                "<text x=\"0\" y=\"{y}\" font-size=\"12\" fill=\"currentColor\">{}</text>\
                 <text x=\"{WIDTH}\" y=\"{y}\" font-size=\"12\" text-anchor=\"end\" fill=\"currentColor\">{}</text>",
                esc(first),
                esc(last),
                y = HEIGHT + AXIS - 4,
            ));
        }
    }
    svg.push_str(&format!("</svg><figcaption>{}</figcaption></figure>", esc(title)));
    svg
}

/// The last `n` UTC days up to `today` (inclusive), oldest first, with the
/// values found in `by_day` (zero elsewhere).
pub fn days(today_ms: i64, n: i64, by_day: &std::collections::BTreeMap<String, i64>) -> Vec<(String, i64)> {
    (0..n)
        .rev()
        .map(|back| {
            let day = cxmpute_store::day_of(today_ms - back * 86_400_000);
            let v = by_day.get(&day).copied().unwrap_or(0);
            (day, v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_have_a_title_a_description_and_one_bar_per_value() {
        let bars = vec![("2026-01-01".to_string(), 5), ("2026-01-02".to_string(), 10)];
        let svg = bar_chart("c", "Spend <per day>", &bars, |v| format!("{v} credits"));
        assert!(svg.contains("<title id=\"c-t\">Spend &lt;per day&gt;</title>"));
        assert!(svg.contains("highest 10 credits, total 15 credits"));
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("2026-01-02: 10 credits"));
        let empty = bar_chart("e", "Nothing", &[], |v| v.to_string());
        assert!(empty.contains("No data yet."));
    }

    #[test]
    fn missing_days_are_zero() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("1970-01-02".to_string(), 7);
        let d = days(2 * 86_400_000, 3, &m);
        assert_eq!(
            d,
            vec![
                ("1970-01-01".to_string(), 0),
                ("1970-01-02".to_string(), 7),
                ("1970-01-03".to_string(), 0)
            ]
        );
    }
}
