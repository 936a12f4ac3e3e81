fn main() -> std::process::ExitCode {
    murmur_relay::cli::main()
}
