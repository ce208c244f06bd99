//! What one scenario run measured, and the JSON line it becomes.
//!
//! The line's fields and their order are fixed by DESIGN §6:
//! `{"bridge","scenario","ops","seconds","ops_per_s","p50_us","p99_us","peak_rss_kb"}`.

use std::time::Duration;

use serde::Serialize;

use crate::workload::Scenario;

/// The result of one timed run.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The bridge name (`default`, `amqp`, …) or the baseline's label (`raw-tokio`).
    pub bridge: String,
    /// Which scenario.
    pub scenario: Scenario,
    /// Operations completed (calls, deliveries or jobs).
    pub ops: u64,
    /// Wall time of the timed part.
    pub elapsed: Duration,
    /// Per-operation latencies, where the scenario measures them.
    pub latency: Option<Percentiles>,
    /// `VmHWM` of the process right after the run: the peak since the run began where the
    /// peak could be reset ([`reset_peak_rss`]), else since the process started.
    pub peak_rss_kb: Option<u64>,
    /// A note for the human table (e.g. the queue worker's mode).
    pub note: Option<String>,
}

impl Measurement {
    /// A measurement stamped with the process's peak RSS now.
    pub fn new(bridge: &str, scenario: Scenario, ops: u64, elapsed: Duration) -> Self {
        Measurement {
            bridge: bridge.to_string(),
            scenario,
            ops,
            elapsed,
            latency: None,
            peak_rss_kb: peak_rss_kb(),
            note: None,
        }
    }

    /// Adds latencies (`None` when there were no samples).
    pub fn with_latency(mut self, latency: Option<Percentiles>) -> Self {
        self.latency = latency;
        self
    }

    /// Adds a note for the human table.
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// Operations per second.
    pub fn ops_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    /// The JSON line for stdout.
    pub fn json_line(&self) -> String {
        let line = JsonLine {
            bridge: &self.bridge,
            scenario: self.scenario.name(),
            ops: self.ops,
            seconds: round(self.elapsed.as_secs_f64(), 6),
            ops_per_s: round(self.ops_per_s(), 1),
            p50_us: self.latency.map(|l| round(l.p50_us, 1)),
            p99_us: self.latency.map(|l| round(l.p99_us, 1)),
            peak_rss_kb: self.peak_rss_kb,
        };
        // A struct of numbers and plain strings always serializes.
        serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// The stdout record; field order is the output order.
#[derive(Serialize)]
struct JsonLine<'a> {
    bridge: &'a str,
    scenario: &'a str,
    ops: u64,
    seconds: f64,
    ops_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    peak_rss_kb: Option<u64>,
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// Median and 99th percentile of per-operation latencies, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples_ns` (nanoseconds); `None` when empty.
    pub fn of(mut samples_ns: Vec<u64>) -> Option<Percentiles> {
        if samples_ns.is_empty() {
            return None;
        }
        samples_ns.sort_unstable();
        let at = |p: f64| {
            let rank = (p * samples_ns.len() as f64).ceil() as usize;
            samples_ns[rank.clamp(1, samples_ns.len()) - 1] as f64 / 1_000.0
        };
        Some(Percentiles {
            p50_us: at(0.50),
            p99_us: at(0.99),
        })
    }
}

/// Resets the process's peak resident set to what is resident now (Linux: `5` written to
/// `/proc/self/clear_refs`), so the next [`peak_rss_kb`] is the peak of what ran in between.
/// Freed heap memory is handed back to the system first (glibc keeps it otherwise), so an
/// earlier phase's garbage does not count towards the next one. False where the peak cannot be
/// reset.
pub fn reset_peak_rss() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas; it touches no
    // live allocation and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), in kB; `None` where that
/// file does not exist.
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<u64> = (1..=100).map(|us| us * 1_000).collect();
        let p = Percentiles::of(samples).expect("samples");
        assert_eq!(p.p50_us, 50.0);
        assert_eq!(p.p99_us, 99.0);
    }

    #[test]
    fn json_line_has_the_fields_in_design_order() {
        let m = Measurement::new("default", Scenario::Fanout, 10, Duration::from_secs(2));
        let line = m.json_line();
        let keys: Vec<&str> = [
            "bridge",
            "scenario",
            "ops",
            "seconds",
            "ops_per_s",
            "p50_us",
            "p99_us",
            "peak_rss_kb",
        ]
        .to_vec();
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| line.find(&format!("\"{k}\"")).expect("key present"))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert!(line.contains("\"p50_us\":null"), "{line}");
        assert!(line.contains("\"ops_per_s\":5.0"), "{line}");
    }

    #[test]
    fn the_peak_resets_to_what_is_resident_now() {
        if !cfg!(target_os = "linux") {
            return;
        }
        {
            // Touch 32 MB so the peak is well above what stays resident afterwards.
            let big = vec![1u8; 32 << 20];
            assert_eq!(big.iter().map(|&b| u64::from(b)).sum::<u64>(), 32 << 20);
        }
        let before = peak_rss_kb().expect("VmHWM on linux");
        assert!(
            reset_peak_rss(),
            "clear_refs is writable for the process itself"
        );
        let after = peak_rss_kb().expect("VmHWM on linux");
        assert!(
            after + 16 * 1024 < before,
            "peak {before} kB → {after} kB after the reset"
        );
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_kb().is_some_and(|kb| kb > 0));
        }
    }
}
