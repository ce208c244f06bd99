//! Case outcomes recorded by the test targets, so the capability matrix can be checked from
//! the run that just happened instead of running every case a second time.
//!
//! With [`RESULTS_ENV`] naming a directory, each case a bridge's test target runs (one copy,
//! not the stress mode) leaves `<dir>/<bridge>/<group>::<case>` holding its outcome: `passed`,
//! `rejected\t<need>` or `failed\t<why>`. `matrix --results <dir>` takes a recorded outcome
//! where there is one and runs the case itself where there is none. Give an absolute path
//! (test binaries run in their package's directory, the matrix where it is started) and a
//! fresh directory per run (`scripts/test` does both), or outcomes of an older build would
//! count.

use std::path::{Path, PathBuf};

use crate::harness::Harness;
use crate::matrix::Outcome;
use crate::runner::{Case, Verdict};

/// Environment variable naming the directory outcomes are recorded in.
pub const RESULTS_ENV: &str = "PURISTA_CONFORMANCE_RESULTS";

fn file(dir: &Path, bridge: &str, case: Case) -> PathBuf {
    dir.join(bridge)
        .join(format!("{}::{}", case.group, case.name))
}

/// One line, tabs and newlines of the reason flattened.
fn one_line(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}

/// Records how `case` ended on `h`, when [`RESULTS_ENV`] is set and the test target is the
/// bridge's own (`module` = the harness's name: variants such as `amqp_purista` are not in
/// the matrix). A record that cannot be written is a warning on stderr: the matrix check then
/// runs the case itself.
pub fn record(module: &str, h: &dyn Harness, case: Case, outcome: &Result<Verdict, String>) {
    let Some(dir) = std::env::var_os(RESULTS_ENV).filter(|d| !d.is_empty()) else {
        return;
    };
    if module != h.name() {
        return;
    }
    let text = match outcome {
        Ok(Verdict::Passed) => "passed".to_string(),
        Ok(Verdict::RejectedAsUndeclared(need)) => format!("rejected\t{}", one_line(need)),
        // Skips are decided when the tests are listed; the matrix decides them the same way.
        Ok(Verdict::Skipped(_)) => return,
        Err(why) => format!("failed\t{}", one_line(why)),
    };
    let path = file(Path::new(&dir), h.name(), case);
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&path, text));
    if let Err(e) = written {
        eprintln!(
            "warning: could not record the outcome in {}: {e}",
            path.display()
        );
    }
}

/// The outcome recorded for `case` on the bridge named `bridge` in `dir`, if any.
pub fn recorded(dir: &Path, bridge: &str, case: Case) -> Option<Outcome> {
    let text = std::fs::read_to_string(file(dir, bridge, case)).ok()?;
    let (kind, detail) = text.split_once('\t').unwrap_or((text.as_str(), ""));
    match kind.trim() {
        "passed" => Some(Outcome::Passed),
        "rejected" => Some(Outcome::Rejected(detail.to_string())),
        "failed" => Some(Outcome::Failed(detail.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case() -> Case {
        crate::all_cases()
            .into_iter()
            .next()
            .expect("the suite has cases")
    }

    #[test]
    fn an_outcome_read_back_is_the_one_recorded() {
        let dir = std::env::temp_dir().join(format!(
            "purista-results-test-{}",
            purista_core::ids::new_id()
        ));
        let c = case();
        let path = file(&dir, "default", c);
        assert_eq!(recorded(&dir, "default", c), None, "nothing recorded yet");
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("a directory");
        for (text, want) in [
            ("passed", Outcome::Passed),
            (
                "rejected\tmanual ack",
                Outcome::Rejected("manual ack".into()),
            ),
            ("failed\tonly 1 of 2", Outcome::Failed("only 1 of 2".into())),
        ] {
            std::fs::write(&path, text).expect("written");
            assert_eq!(recorded(&dir, "default", c), Some(want));
        }
        std::fs::write(&path, "garbage").expect("written");
        assert_eq!(
            recorded(&dir, "default", c),
            None,
            "an unknown record is no record"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reasons_stay_on_one_line() {
        assert_eq!(one_line("a\tb\nc"), "a b c");
    }
}
