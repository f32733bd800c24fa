//! Reading the services' own Prometheus metrics: a snapshot before and after
//! a run, and the difference, give the per-stage breakdown.

use std::collections::BTreeMap;

/// Series name with its labels, as exposed (`name{a="b"}`) → value.
#[derive(Debug, Default, Clone)]
pub struct Snapshot(BTreeMap<String, f64>);

pub async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<Snapshot> {
    let text = http.get(url).send().await?.error_for_status()?.text().await?;
    Ok(parse(&text))
}

pub fn parse(text: &str) -> Snapshot {
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect();
    Snapshot(series)
}

impl Snapshot {
    /// Sum of every series of metric `name` whose labels include all of
    /// `labels` (`key="value"` pairs).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// `after - before` of a histogram: (observations, seconds in all).
    pub fn histogram_delta(&self, before: &Snapshot, name: &str, labels: &[(&str, &str)]) -> (f64, f64) {
        let count = format!("{name}_count");
        let sum = format!("{name}_sum");
        (self.sum(&count, labels) - before.sum(&count, labels), self.sum(&sum, labels) - before.sum(&sum, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_name_and_labels() {
        let s = parse(
            "# TYPE x counter\nx_total{stage=\"a\",svc=\"w\"} 3\nx_total{stage=\"b\"} 4\nx_total 1\ny_sum 2.5\ny_count 5\n",
        );
        assert_eq!(s.sum("x_total", &[]), 8.0);
        assert_eq!(s.sum("x_total", &[("stage", "a")]), 3.0);
        let before = parse("y_sum 0.5\ny_count 1\n");
        assert_eq!(s.histogram_delta(&before, "y", &[]), (4.0, 2.0));
    }
}
