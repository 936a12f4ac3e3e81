fn main() -> std::process::ExitCode {
    murmur_client::cli::main()
}
