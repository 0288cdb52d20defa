"""The application: suites (TOML), the command line, the HTML report and the perf benchmarks."""
