use clap::Parser;

fn main() {
    let cli = rcx::cli::Cli::parse();
    if let Err(err) = rcx::cli::run(cli) {
        // One line, so that scripts and users can read it at a glance.
        let msg = err.to_string().replace('\n', " ");
        eprintln!("rcx: error: {msg}");
        std::process::exit(err.exit_code());
    }
}
