//! The human summary on stderr: each scenario next to its raw baseline, the ratio, and the
//! performance targets.

use crate::measurement::Measurement;
use crate::workload::Scenario;

/// Peak RSS the whole bench may reach, in kB (64 MB).
pub const PEAK_RSS_TARGET_KB: u64 = 64 * 1024;

/// What a scenario should reach on a bridge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// At least this fraction of the raw baseline's ops/s.
    Ratio(f64),
    /// At least this many ops/s.
    OpsPerSecond(f64),
    /// No target set: the figure is reported only.
    None,
}

/// A scenario the bench did not run, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// Which scenario.
    pub scenario: Scenario,
    /// Why, for the table.
    pub reason: String,
}

impl Target {
    /// The target of `scenario` on the bridge named `bridge`.
    ///
    /// In process the broker is tokio itself, so purista's own cost dominates and the ratios
    /// are lower; on RabbitMQ the broker's round trips dominate and purista should stay close.
    pub fn of(bridge: &str, scenario: Scenario) -> Target {
        match (bridge, scenario) {
            ("amqp", Scenario::CmdSeq | Scenario::Fanout) => Target::Ratio(0.7),
            ("amqp", _) => Target::None,
            // Issue 11: on Dapr every figure within 0.7 of plain HTTP through the same sidecars.
            ("dapr", Scenario::CmdSeq | Scenario::CmdConc | Scenario::Fanout) => Target::Ratio(0.7),
            ("dapr", _) => Target::None,
            // Issue 10: on AWS (moto) events and cmd-seq within 0.7 of the bare SDK.
            ("aws", Scenario::CmdSeq | Scenario::Fanout) => Target::Ratio(0.7),
            ("aws", _) => Target::None,
            (_, Scenario::CmdSeq) => Target::Ratio(0.5),
            (_, Scenario::CmdConc) => Target::Ratio(0.4),
            (_, Scenario::Fanout) => Target::Ratio(0.25),
            (_, Scenario::Queue) => Target::OpsPerSecond(200_000.0),
        }
    }

    fn describe(self) -> String {
        match self {
            Target::Ratio(r) => format!("ratio ≥ {r:.2}"),
            Target::OpsPerSecond(n) => format!("≥ {} ops/s", thousands(n)),
            Target::None => "none".to_string(),
        }
    }

    /// `Some(true)` when met, `None` when it cannot be judged (no baseline for a ratio, or no
    /// target).
    fn met(self, measured: &Measurement, ratio: Option<f64>) -> Option<bool> {
        match self {
            Target::Ratio(r) => ratio.map(|x| x >= r),
            Target::OpsPerSecond(n) => Some(measured.ops_per_s() >= n),
            Target::None => None,
        }
    }
}

/// One line per measurement, as it finishes.
pub fn progress_line(m: &Measurement) -> String {
    let latency = m
        .latency
        .map(|l| format!(", p50 {:.1} µs, p99 {:.1} µs", l.p50_us, l.p99_us))
        .unwrap_or_default();
    format!(
        "  {} on {}: {} ops in {:.3} s = {} ops/s{latency}",
        m.scenario,
        m.bridge,
        m.ops,
        m.elapsed.as_secs_f64(),
        thousands(m.ops_per_s()),
    )
}

/// The summary table: bridge figures, raw figures, ratios and targets, then skipped scenarios.
pub fn summary(bridge: &[Measurement], raw: &[Measurement], skipped: &[Skipped]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<9} {:>13} {:>9} {:>9} {:>13} {:>7}  {:<24} {}\n",
        "scenario", "ops/s", "p50 µs", "p99 µs", "raw ops/s", "ratio", "target", "note"
    ));
    for m in bridge {
        let baseline = raw.iter().find(|r| r.scenario == m.scenario);
        let ratio = baseline
            .map(|r| r.ops_per_s())
            .filter(|raw| *raw > 0.0)
            .map(|raw| m.ops_per_s() / raw);
        let target = Target::of(&m.bridge, m.scenario);
        let verdict = match (target, target.met(m, ratio)) {
            (Target::None, _) => "",
            (_, Some(true)) => "met",
            (_, Some(false)) => "MISSED",
            (_, None) => "n/a",
        };
        let (p50, p99) = match m.latency {
            Some(l) => (format!("{:.1}", l.p50_us), format!("{:.1}", l.p99_us)),
            None => ("-".to_string(), "-".to_string()),
        };
        out.push_str(&format!(
            "{:<9} {:>13} {:>9} {:>9} {:>13} {:>7}  {:<24} {}\n",
            m.scenario.name(),
            thousands(m.ops_per_s()),
            p50,
            p99,
            baseline
                .map(|r| thousands(r.ops_per_s()))
                .unwrap_or("-".into()),
            ratio.map(|r| format!("{r:.3}")).unwrap_or("-".into()),
            format!("{} {verdict}", target.describe()),
            m.note.as_deref().unwrap_or(""),
        ));
    }
    for s in skipped {
        out.push_str(&format!(
            "{:<9} {:>13} {:>9} {:>9} {:>13} {:>7}  {:<24} {}\n",
            s.scenario.name(),
            "skipped",
            "-",
            "-",
            "-",
            "-",
            "-",
            s.reason,
        ));
    }
    out
}

/// The peak RSS lines: the peak while purista ran (judged against the target) and, when a raw
/// baseline ran, its own peak. `per_phase` says whether each phase's peak was counted from its
/// start; otherwise the one figure is the whole process's peak.
pub fn rss_line(purista_kb: Option<u64>, raw_kb: Option<u64>, per_phase: bool) -> String {
    let mb = |kb: u64| kb as f64 / 1024.0;
    let judged = |scope: &str, kb: u64| {
        format!(
            "peak RSS {scope}: {:.1} MB (target ≤ {} MB) {}",
            mb(kb),
            PEAK_RSS_TARGET_KB / 1024,
            if kb <= PEAK_RSS_TARGET_KB {
                "met"
            } else {
                "MISSED"
            }
        )
    };
    if !per_phase {
        return match purista_kb {
            Some(kb) => judged("of the whole bench", kb),
            None => "peak RSS of the whole bench: unknown (no /proc/self/status)".to_string(),
        };
    }
    let mut lines = Vec::new();
    if let Some(kb) = purista_kb {
        lines.push(judged("while purista ran", kb));
    }
    if let Some(kb) = raw_kb {
        lines.push(format!(
            "peak RSS while the raw baseline ran: {:.1} MB",
            mb(kb)
        ));
    }
    if !lines.is_empty() {
        lines.push(
            "(each phase's peak counted from its start, after freed memory went back to the \
             system; what earlier phases still hold is included)"
                .to_string(),
        );
    }
    lines.join("\n")
}

/// `1234567.8` as `1 234 568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_rss_target_is_judged_on_purista_alone() {
        let both = rss_line(Some(40 * 1024), Some(90 * 1024), true);
        assert!(
            both.contains("while purista ran: 40.0 MB (target ≤ 64 MB) met"),
            "{both}"
        );
        assert!(both.contains("raw baseline ran: 90.0 MB"), "{both}");
        let over = rss_line(Some(70 * 1024), None, true);
        assert!(over.contains("MISSED"), "{over}");
        let whole = rss_line(Some(70 * 1024), Some(10), false);
        assert!(
            whole.starts_with("peak RSS of the whole bench: 70.0 MB"),
            "{whole}"
        );
        assert!(!whole.contains("raw"), "{whole}");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(1_234_567.8), "1 234 568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.0), "0");
    }

    #[test]
    fn summary_shows_the_ratio_to_the_baseline() {
        let bridge = Measurement::new("default", Scenario::CmdSeq, 100, Duration::from_secs(1));
        let raw = Measurement::new("raw-tokio", Scenario::CmdSeq, 200, Duration::from_secs(1));
        let table = summary(&[bridge], &[raw], &[]);
        assert!(table.contains("0.500"), "{table}");
        assert!(table.contains("ratio ≥ 0.50 met"), "{table}");
    }

    #[test]
    fn amqp_targets_are_ratios_for_commands_and_events() {
        assert_eq!(Target::of("amqp", Scenario::CmdSeq), Target::Ratio(0.7));
        assert_eq!(Target::of("amqp", Scenario::Fanout), Target::Ratio(0.7));
        assert_eq!(Target::of("amqp", Scenario::CmdConc), Target::None);
        assert_eq!(Target::of("default", Scenario::CmdSeq), Target::Ratio(0.5));
    }

    #[test]
    fn dapr_targets_are_ratios_for_invocations_and_events() {
        for scenario in [Scenario::CmdSeq, Scenario::CmdConc, Scenario::Fanout] {
            assert_eq!(Target::of("dapr", scenario), Target::Ratio(0.7));
        }
        assert_eq!(Target::of("dapr", Scenario::Queue), Target::None);
    }

    #[test]
    fn skipped_scenarios_get_a_row_with_the_reason() {
        let skipped = Skipped {
            scenario: Scenario::Queue,
            reason: "no queue bridge".to_string(),
        };
        let table = summary(&[], &[], &[skipped]);
        assert!(
            table.contains("queue") && table.contains("skipped"),
            "{table}"
        );
        assert!(table.contains("no queue bridge"), "{table}");
    }
}
