fn main() -> std::process::ExitCode {
    tether_agent::cli::main()
}
