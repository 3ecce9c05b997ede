//! The `p0-relay` binary: a thin shell over the library's command line.

// mimalloc: the webhook path allocates many small, short-lived values (parsed JSON, answers),
// which glibc's allocator serves markedly slower under concurrency.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    p0_relay::cli::main()
}
