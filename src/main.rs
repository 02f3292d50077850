//! The `till` binary: parse the command line, run, exit with a code.

fn main() -> std::process::ExitCode {
    till::cli::main()
}
