//! What a benchmark prints and saves: rows of a table (rate, latency percentiles, ratios),
//! the machine it ran on, and peak memory of the processes measured.

use std::time::Duration;

use serde_json::{Value, json};

/// Latencies of one measurement, in microseconds.
#[derive(Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.0.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `quantile` (0..1) in milliseconds, nearest-rank; 0 when empty.
    pub fn percentile_ms(&mut self, quantile: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((quantile * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1] as f64 / 1000.0
    }
}

/// `count` operations over `elapsed`, per second.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// One line of the results table.
pub struct Row {
    pub scenario: String,
    /// Operations (messages or requests) per second.
    pub rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// Free-form: ratios, hit rates, counts.
    pub note: String,
}

impl Row {
    pub fn rate(scenario: &str, rate: f64, note: impl Into<String>) -> Self {
        Self { scenario: scenario.into(), rate, p50_ms: None, p99_ms: None, p999_ms: None, note: note.into() }
    }

    pub fn with_latencies(scenario: &str, rate: f64, latencies: &mut Latencies, note: impl Into<String>) -> Self {
        Self {
            scenario: scenario.into(),
            rate,
            p50_ms: Some(latencies.percentile_ms(0.50)),
            p99_ms: Some(latencies.percentile_ms(0.99)),
            p999_ms: Some(latencies.percentile_ms(0.999)),
            note: note.into(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "rate_per_second": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "note": self.note,
        })
    }
}

pub struct Report {
    pub title: String,
    pub settings: Value,
    pub rows: Vec<Row>,
    /// Named results beyond the rows (ratios, peak memory…).
    pub results: serde_json::Map<String, Value>,
}

impl Report {
    pub fn new(title: &str, settings: Value) -> Self {
        Self { title: title.into(), settings, rows: Vec::new(), results: serde_json::Map::new() }
    }

    pub fn push(&mut self, row: Row) {
        eprintln!("  {}", format_row(&row));
        self.rows.push(row);
    }

    pub fn result(&mut self, name: &str, value: impl Into<Value>) {
        self.results.insert(name.into(), value.into());
    }

    /// Prints the table to stdout and writes the JSON file.
    pub fn finish(&self, json_path: &std::path::Path) -> anyhow::Result<()> {
        let machine = machine();
        println!("\n{} — {}", self.title, machine["summary"].as_str().unwrap_or_default());
        println!("{:<34} {:>12} {:>9} {:>9} {:>9}  note", "scenario", "per second", "p50 ms", "p99 ms", "p99.9 ms");
        for row in &self.rows {
            println!("{}", format_row(row));
        }
        for (name, value) in &self.results {
            println!("{name}: {value}");
        }
        let document = json!({
            "title": self.title,
            "at": chrono::Utc::now().to_rfc3339(),
            "machine": machine,
            "settings": self.settings,
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "results": self.results,
        });
        if let Some(parent) = json_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(json_path, serde_json::to_vec_pretty(&document)?)?;
        println!("results written to {}", json_path.display());
        Ok(())
    }
}

fn format_row(row: &Row) -> String {
    let cell = |value: Option<f64>| value.map_or_else(|| "—".to_owned(), |value| format!("{value:.2}"));
    format!(
        "{:<34} {:>12.0} {:>9} {:>9} {:>9}  {}",
        row.scenario,
        row.rate,
        cell(row.p50_ms),
        cell(row.p99_ms),
        cell(row.p999_ms),
        row.note
    )
}

/// CPU model, core count, memory and kernel of this machine.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split(':').nth(1))
        .map(|model| model.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with("MemTotal"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    json!({
        "cpu": model,
        "cores": cores,
        "memory_gib": memory_kb as f64 / 1_048_576.0,
        "kernel": kernel,
        "summary": format!("{cores} cores ({model}), {:.0} GiB, Linux {kernel}", memory_kb as f64 / 1_048_576.0),
    })
}

/// Peak resident memory of a process so far (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|line| line.starts_with("VmHWM"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut latencies = Latencies::default();
        for micros in 1..=1000 {
            latencies.record(Duration::from_micros(micros));
        }
        assert_eq!(latencies.percentile_ms(0.5), 0.5);
        assert_eq!(latencies.percentile_ms(0.99), 0.99);
        assert_eq!(latencies.percentile_ms(0.999), 0.999);
        assert_eq!(Latencies::default().percentile_ms(0.99), 0.0);
    }
}
