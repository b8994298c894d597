//! Logs to stderr in the form journald understands: a `<N>` syslog
//! priority prefix on each line, no timestamp (journald adds its own).
//! Outside systemd (a terminal, a test) lines get a timestamp instead.

use std::io::Write;

struct Logger {
    journald: bool,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let priority = match record.level() {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            log::Level::Debug | log::Level::Trace => 7,
        };
        let line = if self.journald {
            format!("<{priority}>{}\n", record.args())
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!(
                "{}.{:03} {:<5} {}\n",
                now.as_secs(),
                now.subsec_millis(),
                record.level(),
                record.args()
            )
        };
        // One write per line so lines from threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        if record.level() <= log::Level::Info {
            remember(record);
        }
    }

    fn flush(&self) {}
}

pub fn init(verbose: bool) {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let logger = Box::leak(Box::new(Logger { journald }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(if verbose {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Info
        });
    }
}

/// Lines kept for `hadb log`.
const RECENT: usize = 500;

static RECENT_LINES: std::sync::Mutex<std::collections::VecDeque<String>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

fn remember(record: &log::Record<'_>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let line = format!(
        "{}.{:03} {:<5} {}",
        now.as_secs(),
        now.subsec_millis(),
        record.level(),
        record.args()
    );
    let mut recent = RECENT_LINES.lock().unwrap_or_else(|e| e.into_inner());
    if recent.len() == RECENT {
        recent.pop_front();
    }
    recent.push_back(line);
}

/// The last `n` informational, warning and error lines, oldest first.
pub fn recent(n: usize) -> Vec<String> {
    let recent = RECENT_LINES.lock().unwrap_or_else(|e| e.into_inner());
    recent
        .iter()
        .skip(recent.len().saturating_sub(n))
        .cloned()
        .collect()
}
