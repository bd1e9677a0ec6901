//! An experiment's results: tables, notes and plots, written as Markdown and
//! JSON into `bench/results/`, and copied into `bench/README.md` between
//! the experiment's markers so that the README shows what the command wrote.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::stamp::Stamp;

/// A table of strings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Table {
    /// Line above the table.
    pub caption: String,
    /// Column headings.
    pub header: Vec<String>,
    /// Cells, row by row.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(caption: impl Into<String>, header: &[&str]) -> Self {
        Table {
            caption: caption.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        let mut s = format!("{}\n\n| {} |\n", self.caption, self.header.join(" | "));
        s.push_str(&format!("|{}\n", "---|".repeat(self.header.len())));
        for row in &self.rows {
            s.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        s
    }
}

/// One job behind the results.
#[derive(Clone, Debug, Serialize)]
pub struct JobSummary {
    /// Variant label.
    pub variant: String,
    /// Seed.
    pub seed: u64,
    /// The job's wall time in seconds, for planning budgets only: it is not
    /// a speed measurement (cached tasks take no time, and other work may
    /// have shared the machine); speed is `bench/compare.sh`'s job.
    pub wall_seconds: f64,
    /// Models whose training came from the task cache.
    pub cached_models: Vec<String>,
}

/// Everything an experiment reports.
#[derive(Clone, Debug, Serialize)]
pub struct Results {
    /// File stem.
    pub name: String,
    /// Heading.
    pub title: String,
    /// The command that produced them.
    pub command: String,
    /// The stated budget.
    pub budget: String,
    /// Where, when, which code.
    pub stamp: Stamp,
    /// The tables.
    pub tables: Vec<Table>,
    /// Remarks under the tables (comparisons, choices made on validation).
    pub notes: Vec<String>,
    /// Plot files, relative to the results folder.
    pub plots: Vec<String>,
    /// The jobs.
    pub jobs: Vec<JobSummary>,
    /// The raw figures, per seed.
    pub data: serde_json::Value,
}

impl Results {
    /// The Markdown body (without the heading).
    pub fn body(&self, plot_prefix: &str) -> String {
        let mut s = format!(
            "{}\n\nCommand: `{}`. Budget: {}\n\n",
            self.stamp.markdown(),
            self.command,
            self.budget
        );
        for t in &self.tables {
            s.push_str(&t.markdown());
            s.push('\n');
        }
        for n in &self.notes {
            s.push_str(&format!("- {n}\n"));
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        for p in &self.plots {
            s.push_str(&format!("![{p}]({plot_prefix}{p})\n\n"));
        }
        s
    }

    /// Writes `<name>.md` and `<name>.json` into `dir`, and the body into
    /// `readme` (if given) between `<!-- results:<name> -->` and
    /// `<!-- /results:<name> -->` when it has those markers.
    pub fn write(&self, dir: &Path, readme: Option<&Path>) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let md = format!("# {}\n\n{}", self.title, self.body(""));
        std::fs::write(dir.join(format!("{}.md", self.name)), md)?;
        std::fs::write(
            dir.join(format!("{}.json", self.name)),
            serde_json::to_vec_pretty(self)?,
        )?;
        let Some(readme) = readme else {
            return Ok(());
        };
        if let Ok(text) = std::fs::read_to_string(readme) {
            let updated = replace_block(&text, &self.name, &self.body("results/"))
                .with_context(|| format!("{} has no results block", readme.display()));
            match updated {
                Ok(updated) => std::fs::write(readme, updated)?,
                Err(e) => eprintln!("note: {e:#}"),
            }
        }
        Ok(())
    }
}

/// `text` with the block of `name` replaced by `body`.
fn replace_block(text: &str, name: &str, body: &str) -> Option<String> {
    let open = format!("<!-- results:{name} -->");
    let close = format!("<!-- /results:{name} -->");
    let start = text.find(&open)? + open.len();
    let end = start + text[start..].find(&close)?;
    Some(format!("{}\n{}{}", &text[..start], body, &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_own_block() {
        let text = "a\n<!-- results:x -->\nold\n<!-- /results:x -->\n<!-- results:y -->\nkeep\n<!-- /results:y -->\n";
        let out = replace_block(text, "x", "new\n").unwrap();
        assert_eq!(
            out,
            "a\n<!-- results:x -->\nnew\n<!-- /results:x -->\n<!-- results:y -->\nkeep\n<!-- /results:y -->\n"
        );
        assert!(replace_block(text, "z", "").is_none());
    }

    #[test]
    fn table_renders_as_markdown() {
        let mut t = Table::new("Test errors", &["model", "errors"]);
        t.row(vec!["student".into(), "74".into()]);
        assert_eq!(
            t.markdown(),
            "Test errors\n\n| model | errors |\n|---|---|\n| student | 74 |\n"
        );
    }
}
