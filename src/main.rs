//! The `p0-relay` binary: a thin shell over the library's command line.

fn main() -> std::process::ExitCode {
    p0_relay::cli::main()
}
