fn main() -> std::process::ExitCode {
    murmur_devnet::cli::main()
}
