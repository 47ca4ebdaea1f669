//! Log setup: tracing to stderr, as text for humans or one JSON object per line.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.with_target(false).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
