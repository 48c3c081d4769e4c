fn main() -> std::process::ExitCode {
    tether_relay::cli::main()
}
