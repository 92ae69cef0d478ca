//! How results are printed: aligned tables for people, JSON for scripts.

use std::io::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use comfy_table::{presets, Table};
use serde::Serialize;

use crate::error::CliError;

/// Where a command's result goes (stdout), in the format asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    /// JSON instead of tables.
    pub(crate) json: bool,
}

impl Output {
    /// Prints `value` as one JSON document.
    pub(crate) fn json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, value).map_err(|e| match e.io_error_kind() {
            Some(kind) => CliError::io("writing to stdout")(kind.into()),
            None => CliError::Other(format!("writing JSON: {e}")),
        })?;
        writeln!(out).map_err(CliError::io("writing to stdout"))
    }

    /// Prints a table with `headers` and `rows`.
    pub(crate) fn table(&self, headers: &[&str], rows: Vec<Vec<String>>) -> Result<(), CliError> {
        let mut table = Table::new();
        table.load_preset(presets::UTF8_BORDERS_ONLY);
        table.set_header(headers.iter().copied());
        for row in rows {
            table.add_row(row);
        }
        self.line(&table.to_string())
    }

    /// Prints one line of text.
    pub(crate) fn line(&self, text: &str) -> Result<(), CliError> {
        writeln!(std::io::stdout().lock(), "{text}").map_err(CliError::io("writing to stdout"))
    }

    /// Prints `key: value` pairs, aligned.
    pub(crate) fn pairs(&self, pairs: &[(&str, String)]) -> Result<(), CliError> {
        let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let text: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k:<width$}  {v}"))
            .collect();
        self.line(&text.join("\n"))
    }
}

/// A timestamp as people read it: RFC 3339, UTC, microseconds.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An optional timestamp, `-` when absent.
pub(crate) fn maybe_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".to_owned(), time)
}

/// A byte count in binary units.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `text` cut to `max` characters, with an ellipsis when cut.
pub(crate) fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}
