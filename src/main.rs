//! The `p0-relay` binary: a thin shell over the library's command line.

// mimalloc: the webhook path allocates many small, short-lived values (parsed JSON, answers),
// which glibc's allocator serves markedly slower under concurrency. Built without transparent
// huge pages (`no_thp`): with them, its arenas were backed by 2 MiB pages as soon as touched,
// about 10 MiB of resident memory at idle that the relay never used.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    p0_relay::server::raise_open_files_limit();
    p0_relay::cli::main()
}
