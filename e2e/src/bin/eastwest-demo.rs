//! `eastwest-demo`: the east-west mesh demo that `cargo xtask demo` runs (see
//! `eastwest_e2e::demo`). Exits 0 when the run completed (or `--keep-running` was ended with
//! Ctrl-C), 130 when Ctrl-C cut the traffic short, 1 on errors.

use eastwest_e2e::demo::{self, DemoOptions, Outcome};

fn main() {
    demo::signal::install();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match DemoOptions::parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{}", demo::USAGE);
            return;
        }
        Err(error) => {
            eprintln!("eastwest-demo: {error:#}");
            std::process::exit(2);
        }
    };
    match demo::run(&options) {
        Ok(Outcome::Completed) => {}
        Ok(Outcome::Interrupted) => std::process::exit(130),
        Err(error) => {
            eprintln!("eastwest-demo: {error:#}");
            std::process::exit(1);
        }
    }
}
