//! The `till` binary: parse the command line, run, exit with a code.

// The proxy allocates and frees small buffers on several threads (tokio
// workers, the store writer, the audit writer); glibc's malloc serialises
// them on arena locks, which showed as a quarter of the proxy's CPU in
// futex waits and context switches (benches/README.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    till::cli::main()
}
