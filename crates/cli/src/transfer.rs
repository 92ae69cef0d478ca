//! `export` and `import`: a user's history as JSON Lines, one [`StepRecord`] per line, read
//! and written a page or a batch at a time so memory stays flat whatever the size.
//!
//! Interrupted (Ctrl-C or SIGTERM), both stop at a safe point and say what was done, exiting
//! 128 + the signal's number: `export` after whole lines (to a file: the `.partial` file is
//! removed and the target left as it was), `import` after the batch being written commits
//! (it names the last line committed; importing the same file again is safe).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use taskhistory_core::validate;
use taskhistory_core::{DynStore, HistoryScan, StepRecord, StoreError};

use crate::error::{exit, CliError};
use crate::interrupt::Interrupt;
use crate::output::Output;
use crate::progress::Progress;

/// Steps read per scan page.
pub(crate) const PAGE: i64 = 5_000;

/// Bad lines kept in the final report (all are printed on stderr as they are found).
const REPORTED_BAD_LINES: usize = 100;

#[derive(Debug, Serialize)]
struct ExportReport {
    user_id: String,
    task_id: Option<String>,
    steps: u64,
    tasks: u64,
    output: Option<PathBuf>,
}

/// Writes every step `scan` reaches, page by page, to `path` (complete or not at all) or to
/// stdout (whole lines, also when interrupted).
pub(crate) async fn export(
    store: &DynStore,
    user: &str,
    mut scan: HistoryScan,
    path: Option<&Path>,
    interrupt: &Interrupt,
    out: Output,
) -> Result<u8, CliError> {
    let partial = path.map(|p| {
        let mut name = p.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    });
    let sink: Box<dyn Write> = match &partial {
        Some(p) => {
            Box::new(File::create(p).map_err(CliError::io(format!("creating {}", p.display())))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut sink = BufWriter::with_capacity(1 << 16, sink);
    let progress = Progress::new("export", "steps", None);
    let mut report = ExportReport {
        user_id: user.to_owned(),
        task_id: scan.task_id.clone(),
        steps: 0,
        tasks: 0,
        output: path.map(Path::to_path_buf),
    };
    let mut last_task: Option<String> = None;
    let written: Result<(), CliError> = async {
        loop {
            let page = store.scan_history(user, &scan).await?;
            for record in &page.steps {
                serde_json::to_writer(&mut sink, record).map_err(|e| match e.io_error_kind() {
                    Some(kind) => CliError::io("writing the export")(kind.into()),
                    None => CliError::Other(format!("writing the export: {e}")),
                })?;
                sink.write_all(b"\n")
                    .map_err(CliError::io("writing the export"))?;
                report.steps += 1;
                if last_task.as_deref() != Some(record.task_id.as_str()) {
                    report.tasks += 1;
                    last_task = Some(record.task_id.clone());
                }
            }
            progress.set(report.steps);
            // Between pages the sink holds whole lines only: a safe point to stop.
            if interrupt.signal().is_some() {
                break;
            }
            match page.next {
                Some(next) => scan = scan.after(Some(next)),
                None => break,
            }
        }
        sink.flush().map_err(CliError::io("writing the export"))
    }
    .await;
    progress.finish(report.steps);
    drop(sink);
    let stopped = interrupt.signal();
    if written.is_err() || stopped.is_some() {
        if let Some(p) = &partial {
            let _ = std::fs::remove_file(p);
        }
    }
    written?;
    if let Some(signal) = stopped {
        match path {
            Some(path) => eprintln!(
                "taskhistory: interrupted after {} step(s): {} was not written ({} removed)",
                report.steps,
                path.display(),
                partial.as_deref().unwrap_or(path).display()
            ),
            None => eprintln!(
                "taskhistory: interrupted: exported {} step(s) of {} task(s), whole lines; \
                 the export is incomplete",
                report.steps, report.tasks
            ),
        }
        return Ok(signal.exit_code());
    }
    if let (Some(partial), Some(path)) = (&partial, path) {
        std::fs::rename(partial, path)
            .map_err(CliError::io(format!("renaming to {}", path.display())))?;
        if out.json {
            out.json(&report)?;
        } else {
            out.line(&format!(
                "exported {} step(s) of {} task(s) to {}",
                report.steps,
                report.tasks,
                path.display()
            ))?;
        }
    } else {
        eprintln!(
            "exported {} step(s) of {} task(s)",
            report.steps, report.tasks
        );
    }
    Ok(exit::OK)
}

/// A refused line.
#[derive(Debug, Serialize)]
struct BadLine {
    line: u64,
    error: String,
}

#[derive(Debug, Default, Serialize)]
struct ImportReport {
    /// Non-blank lines read.
    lines: u64,
    /// Lines saved.
    imported: u64,
    /// Lines not saved because they, or another line of their batch, are bad.
    refused: u64,
    /// Lines not saved because their task is cancelled in the store (a cancelled task
    /// refuses every write; importing the same file again lands here).
    skipped_cancelled: u64,
    /// The first bad lines.
    bad_lines: Vec<BadLine>,
    /// Every line up to this one is committed (or refused); 0 before the first batch.
    committed_through_line: u64,
    /// Set when a signal stopped the import before the end of its input.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    interrupted: bool,
}

/// One batch being gathered: valid records, and the bad lines among its lines.
#[derive(Default)]
struct Batch {
    records: Vec<StepRecord>,
    bad: Vec<BadLine>,
    first_line: u64,
    last_line: u64,
    lines: u64,
}

/// Reads JSON Lines from `file` (`-` for stdin) and saves them `batch_size` lines at a time.
pub(crate) async fn import(
    store: &DynStore,
    file: &Path,
    batch_size: usize,
    interrupt: &Interrupt,
    out: Output,
) -> Result<u8, CliError> {
    let (reader, total_bytes): (Box<dyn Read + Send>, Option<u64>) = if file.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = File::open(file).map_err(CliError::io(format!("opening {}", file.display())))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let mut lines = read_lines(reader, file);
    let progress = match total_bytes {
        Some(n) => Progress::new("import", "bytes", Some(n)),
        None => Progress::new("import", "lines", None),
    };
    let mut report = ImportReport::default();
    let mut batch = Batch::default();
    let (mut line_no, mut bytes_read) = (0u64, 0u64);
    let mut waiting = interrupt.clone();
    let stopped = loop {
        // A blocked read of stdin must not hide a signal: wait for either.
        let next = tokio::select! {
            biased;
            signal = waiting.wait() => break Some(signal),
            line = lines.recv() => line,
        };
        let Some(line) = next else { break None };
        let buf = line?;
        line_no += 1;
        bytes_read += buf.len() as u64;
        progress.set(if total_bytes.is_some() {
            bytes_read
        } else {
            line_no
        });
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.lines += 1;
        if batch.lines == 0 {
            batch.first_line = line_no;
        }
        batch.lines += 1;
        batch.last_line = line_no;
        match parse_line(&buf) {
            Ok(record) => batch.records.push(record),
            Err(error) => batch.bad.push(BadLine {
                line: line_no,
                error,
            }),
        }
        if batch.lines as usize >= batch_size {
            // A batch being written is let finish: its commit is the safe point.
            let last_line = batch.last_line;
            flush(store, std::mem::take(&mut batch), &mut report).await?;
            report.committed_through_line = last_line;
            if let Some(signal) = interrupt.signal() {
                break Some(signal);
            }
        }
    };
    if stopped.is_none() {
        let last_line = batch.last_line.max(report.committed_through_line);
        flush(store, batch, &mut report).await?;
        report.committed_through_line = last_line;
    } else {
        // The lines of a batch not yet written are not counted as read-and-refused.
        report.lines -= batch.lines;
        report.interrupted = true;
    }
    progress.finish(if total_bytes.is_some() {
        bytes_read
    } else {
        line_no
    });
    if out.json {
        out.json(&report)?;
    } else {
        out.line(&format!(
            "{} line(s): {} imported, {} refused, {} skipped (task cancelled in the store)",
            report.lines, report.imported, report.refused, report.skipped_cancelled
        ))?;
    }
    if let Some(signal) = stopped {
        eprintln!(
            "taskhistory: interrupted: lines up to {} are committed, later lines were not \
             imported; importing the same file again is safe (saved lines are replaced by \
             themselves)",
            report.committed_through_line
        );
        return Ok(signal.exit_code());
    }
    Ok(if report.refused > 0 {
        exit::BAD_INPUT
    } else {
        exit::OK
    })
}

/// Lines read on a thread of their own, so that a read blocked on stdin never blocks the
/// runtime (and the signal that should stop it).
fn read_lines(
    reader: Box<dyn Read + Send>,
    file: &Path,
) -> tokio::sync::mpsc::Receiver<Result<Vec<u8>, CliError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let what = format!("reading {}", file.display());
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(1 << 16, reader);
        loop {
            let mut buf = Vec::new();
            let line = match reader.read_until(b'\n', &mut buf) {
                Ok(0) => return,
                Ok(_) => Ok(buf),
                Err(e) => Err(CliError::io(what.clone())(e)),
            };
            let failed = line.is_err();
            if tx.blocking_send(line).is_err() || failed {
                return;
            }
        }
    });
    rx
}

fn parse_line(line: &[u8]) -> Result<StepRecord, String> {
    let record: StepRecord = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    validate::record("record", &record).map_err(|e| match e {
        StoreError::InvalidInput { field, reason } => format!("{field}: {reason}"),
        other => other.to_string(),
    })?;
    Ok(record)
}

/// Saves one batch, or refuses it whole when it holds a bad line. Records of tasks the
/// store has cancelled are taken out and the rest saved.
async fn flush(
    store: &DynStore,
    mut batch: Batch,
    report: &mut ImportReport,
) -> Result<(), CliError> {
    if batch.lines == 0 {
        return Ok(());
    }
    if !batch.bad.is_empty() {
        for bad in &batch.bad {
            eprintln!(
                "taskhistory: line {}: {}; lines {}-{} (its batch) were not imported",
                bad.line, bad.error, batch.first_line, batch.last_line
            );
        }
        report.refused += batch.lines;
        let room = REPORTED_BAD_LINES.saturating_sub(report.bad_lines.len());
        report.bad_lines.extend(batch.bad.into_iter().take(room));
        return Ok(());
    }
    loop {
        match store.save_batch_task_history(&batch.records).await {
            Ok(()) => {
                report.imported += batch.records.len() as u64;
                return Ok(());
            }
            Err(StoreError::TaskCancelled { user_id, task_id }) => {
                let before = batch.records.len();
                batch
                    .records
                    .retain(|r| r.user_id != user_id || r.task_id != task_id);
                let removed = before - batch.records.len();
                if removed == 0 {
                    // The store named a task this batch does not hold: do not loop.
                    return Err(StoreError::TaskCancelled { user_id, task_id }.into());
                }
                report.skipped_cancelled += removed as u64;
                if batch.records.is_empty() {
                    return Ok(());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
