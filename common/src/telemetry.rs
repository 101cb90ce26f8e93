//! Structured logging through `tracing`: human-readable in a terminal, one JSON object per line
//! with `LOG_FORMAT=json`, level and per-module filters from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Calling it again (tests start several apps in one process)
/// keeps the first one.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    // Colours only for a terminal; log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _already_installed =
        if json { builder.json().flatten_event(true).with_current_span(true).try_init() } else { builder.try_init() };
}
