//! The capability matrix: run every case against every harness and report, per bridge and
//! behaviour group, what actually happened — passed, rejected at startup as undeclared,
//! skipped (with the reason), or failed — plus each bridge's test mode and declared
//! capabilities.
//!
//! The output is deterministic (suite order, no timings), so the README can carry it and CI can
//! compare the committed copy with a fresh run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::harness::Harness;
use crate::runner::{Case, Verdict, run_case_isolated};

/// Marks the start of the generated section in a markdown file.
pub const START_MARKER: &str = "<!-- matrix:start -->";
/// Marks its end.
pub const END_MARKER: &str = "<!-- matrix:end -->";

/// What happened to one case on one bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The behaviour holds.
    Passed,
    /// Undeclared; the strict check refused it as it must.
    Rejected(String),
    /// Not run here; the reason.
    Skipped(String),
    /// Panicked or timed out; the message says why.
    Failed(String),
}

/// One case on one bridge.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Bridge (harness) name.
    pub bridge: &'static str,
    /// Behaviour group.
    pub group: &'static str,
    /// Behaviour.
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
}

/// Runs every case on every harness, at most `jobs` at once, each on a runtime of its own
/// ([`run_case_isolated`]: no case's timing depends on the others) bounded by `timeout`.
/// With `recorded` (a directory of [`crate::results`]), a case the test targets already ran
/// takes its recorded outcome instead of running again; a case planned as skipped is skipped
/// without running either way. `progress` sees each result as it comes. Results come back in
/// suite order.
pub async fn run(
    harnesses: &[Arc<dyn Harness>],
    cases: &[Case],
    jobs: usize,
    timeout: Duration,
    recorded: Option<&std::path::Path>,
    progress: impl Fn(&CaseResult),
) -> Vec<CaseResult> {
    let slots = Arc::new(Semaphore::new(jobs.max(1)));
    // Cases that break a broker take turns on it (a harness serialises them on its node), so
    // they run one at a time here: waiting for a turn must not eat into a case's timeout.
    let breaking = Arc::new(Semaphore::new(1));
    let mut running = Vec::new();
    for h in harnesses {
        for case in cases {
            let known = match case.plan(&**h) {
                crate::plan::Plan::Skip(why) => Some(Outcome::Skipped(why)),
                _ => recorded.and_then(|dir| crate::results::recorded(dir, h.name(), *case)),
            };
            if let Some(outcome) = known {
                let result = CaseResult {
                    bridge: h.name(),
                    group: case.group,
                    name: case.name,
                    outcome,
                };
                running.push(tokio::spawn(async move { result }));
                continue;
            }
            let (h, case, slots, breaking) = (h.clone(), *case, slots.clone(), breaking.clone());
            running.push(tokio::spawn(async move {
                let _turn = if (case.requires)().broker_control {
                    Some(breaking.acquire_owned().await.expect("never closed"))
                } else {
                    None
                };
                let _slot = slots.acquire_owned().await.expect("never closed");
                let bridge = h.name();
                let run = tokio::task::spawn_blocking(move || run_case_isolated(case, h, timeout));
                let outcome = match run.await {
                    Ok(Ok(Verdict::Passed)) => Outcome::Passed,
                    Ok(Ok(Verdict::RejectedAsUndeclared(need))) => Outcome::Rejected(need),
                    Ok(Ok(Verdict::Skipped(why))) => Outcome::Skipped(why),
                    Ok(Err(why)) => Outcome::Failed(why),
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                CaseResult {
                    bridge,
                    group: case.group,
                    name: case.name,
                    outcome,
                }
            }));
        }
    }
    let mut results = Vec::new();
    for r in running {
        let r = r.await.expect("the case runner task itself does not panic");
        progress(&r);
        results.push(r);
    }
    results
}

#[derive(Default)]
struct Cell {
    total: usize,
    passed: usize,
    rejected: usize,
    /// Skipped cases per reason.
    skipped: BTreeMap<String, usize>,
    failed: Vec<&'static str>,
}

impl Cell {
    fn render(&self) -> String {
        if !self.failed.is_empty() {
            let mut names = self.failed.clone();
            names.sort_unstable();
            return format!("failed: {}", names.join(", "));
        }
        let mut parts = Vec::new();
        if self.passed > 0 {
            parts.push(format!("passed {}/{}", self.passed, self.total));
        }
        if self.rejected > 0 {
            parts.push(format!("rejected as undeclared ({})", self.rejected));
        }
        for (why, n) in &self.skipped {
            parts.push(format!("skipped ({n}): {why}"));
        }
        parts.join(", ")
    }
}

/// The matrix as markdown: one row per behaviour group, one column per bridge; then each
/// bridge's test mode, the undeclared needs the strict check rejected, and the declared
/// capabilities.
pub fn render(harnesses: &[Arc<dyn Harness>], cases: &[Case], results: &[CaseResult]) -> String {
    let mut groups: Vec<&'static str> = Vec::new();
    for c in cases {
        if !groups.contains(&c.group) {
            groups.push(c.group);
        }
    }
    let mut cells: BTreeMap<(&str, &str), Cell> = BTreeMap::new();
    let mut rejected: BTreeMap<&str, std::collections::BTreeSet<String>> = BTreeMap::new();
    for r in results {
        let cell = cells.entry((r.bridge, r.group)).or_default();
        cell.total += 1;
        match &r.outcome {
            Outcome::Passed => cell.passed += 1,
            Outcome::Rejected(need) => {
                cell.rejected += 1;
                rejected.entry(r.bridge).or_default().insert(need.clone());
            }
            Outcome::Skipped(why) => *cell.skipped.entry(why.clone()).or_insert(0) += 1,
            Outcome::Failed(_) => cell.failed.push(r.name),
        }
    }

    let mut out = String::from("| behaviour group |");
    for h in harnesses {
        out.push_str(&format!(" {} |", h.name()));
    }
    out.push_str("\n|---|");
    for _ in harnesses {
        out.push_str("---|");
    }
    out.push('\n');
    for g in &groups {
        out.push_str(&format!("| {g} |"));
        for h in harnesses {
            let cell = cells
                .get(&(h.name(), *g))
                .map(Cell::render)
                .unwrap_or_default();
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push('\n');
    for h in harnesses {
        out.push_str(&format!("- `{}`: tested {}", h.name(), h.mode().describe()));
        let workload = h.workload();
        if let Some(why) = workload.why() {
            out.push_str(&format!(
                "; load cases at {} % of their full size ({why})",
                workload.percent()
            ));
        }
        let faults = h.fault_workload();
        if faults != workload
            && let Some(why) = faults.why()
        {
            out.push_str(&format!(
                "; fault cases at {} % of their full size ({why})",
                faults.percent()
            ));
        }
        match rejected.get(h.name()) {
            Some(needs) if !needs.is_empty() => {
                let needs: Vec<&str> = needs.iter().map(String::as_str).collect();
                out.push_str(&format!(
                    "; undeclared and rejected at startup: {}",
                    needs.join("; ")
                ));
            }
            _ => {}
        }
        out.push('\n');
    }
    out.push_str("\nDeclared capabilities:\n\n");
    let caps: Vec<_> = harnesses.iter().map(|h| h.capabilities()).collect();
    let refs: Vec<_> = caps.iter().collect();
    out.push_str(&purista_core::Capabilities::markdown_table(&refs));
    out
}

/// The text between the markers in `doc`, trimmed; `None` when the markers are missing.
pub fn section(doc: &str) -> Option<&str> {
    let start = doc.find(START_MARKER)? + START_MARKER.len();
    let end = start + doc[start..].find(END_MARKER)?;
    Some(doc[start..end].trim())
}

/// `doc` with the text between the markers replaced by `matrix`; `None` without markers.
pub fn replace_section(doc: &str, matrix: &str) -> Option<String> {
    let start = doc.find(START_MARKER)? + START_MARKER.len();
    let end = start + doc[start..].find(END_MARKER)?;
    Some(format!(
        "{}\n{}\n{}",
        &doc[..start],
        matrix.trim(),
        &doc[end..]
    ))
}

/// `matrix` with the columns and notes of the bridges in `unchecked` blanked out: for comparing
/// a committed matrix with a run in which those bridges could not run (their broker did not
/// answer), so that the other columns are still checked.
pub fn without_bridges(matrix: &str, unchecked: &[&str]) -> String {
    let mut columns: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    let mut in_group_table = false;
    for line in matrix.lines() {
        if line.starts_with("| behaviour group |") {
            in_group_table = true;
            columns = line
                .split('|')
                .enumerate()
                .filter(|(_, cell)| unchecked.contains(&cell.trim()))
                .map(|(i, _)| i)
                .collect();
        } else if !line.starts_with('|') {
            in_group_table = false;
        }
        if in_group_table {
            let cells: Vec<String> = line
                .split('|')
                .enumerate()
                .map(|(i, cell)| {
                    if columns.contains(&i) {
                        " (not checked) ".to_string()
                    } else {
                        cell.to_string()
                    }
                })
                .collect();
            out.push(cells.join("|"));
        } else if unchecked
            .iter()
            .any(|b| line.starts_with(&format!("- `{b}`:")))
        {
            continue;
        } else {
            out.push(line.to_string());
        }
    }
    out.join("\n")
}

/// A line diff good enough to show what changed in a small table.
pub fn line_diff(old: &str, new: &str) -> String {
    let old_lines: Vec<&str> = old.lines().collect();
    let new_lines: Vec<&str> = new.lines().collect();
    let mut out = String::new();
    for l in &old_lines {
        if !new_lines.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &new_lines {
        if !old_lines.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_marked_section() {
        let doc = format!("# T\n{START_MARKER}\nold\n{END_MARKER}\ntail\n");
        let new = replace_section(&doc, "new table").expect("markers");
        assert_eq!(
            new,
            format!("# T\n{START_MARKER}\nnew table\n{END_MARKER}\ntail\n")
        );
        assert_eq!(section(&new), Some("new table"));
        assert_eq!(replace_section("no markers", "x"), None);
    }

    #[test]
    fn unchecked_bridges_are_blanked_out() {
        let matrix = "| behaviour group | default | amqp |\n|---|---|---|\n| commands | passed 9/9 | passed 9/9 |\n\n- `default`: tested in process\n- `amqp`: tested against a real broker\n";
        let blanked = without_bridges(matrix, &["amqp"]);
        assert_eq!(
            blanked,
            "| behaviour group | default | (not checked) |\n|---|---| (not checked) |\n| commands | passed 9/9 | (not checked) |\n\n- `default`: tested in process"
        );
    }

    #[test]
    fn a_cell_names_failures_before_anything_else() {
        let cell = Cell {
            total: 4,
            passed: 2,
            rejected: 1,
            skipped: BTreeMap::new(),
            failed: vec!["b_case", "a_case"],
        };
        assert_eq!(cell.render(), "failed: a_case, b_case");
        let cell = Cell {
            total: 4,
            passed: 2,
            rejected: 1,
            skipped: BTreeMap::from([("no queue bridge".to_string(), 1)]),
            failed: vec![],
        };
        assert_eq!(
            cell.render(),
            "passed 2/4, rejected as undeclared (1), skipped (1): no queue bridge"
        );
    }
}
