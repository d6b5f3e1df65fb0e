use clap::Parser;
use clap::error::ErrorKind;

fn main() {
    let cli = match rcx::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => match err.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
            _ => {
                eprintln!("rcx: error: {}", one_line_usage_error(&err.to_string()));
                std::process::exit(2);
            }
        },
    };
    if let Err(err) = rcx::cli::run(cli) {
        // One line, so that scripts and users can read it at a glance.
        let msg = err.to_string().replace('\n', " ");
        eprintln!("rcx: error: {msg}");
        std::process::exit(err.exit_code());
    }
}

/// clap's multi-line message (error, its details, tips, usage, pointer to --help) as one
/// line: the error with its details, then the usage it names.
fn one_line_usage_error(rendered: &str) -> String {
    let lines: Vec<&str> = rendered.lines().map(str::trim).collect();
    let details = lines
        .iter()
        .take_while(|l| !l.starts_with("Usage: ") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ");
    match lines.iter().find_map(|l| l.strip_prefix("Usage: ")) {
        Some(usage) => format!("{details} (usage: {usage}; see --help)"),
        None => details,
    }
}
