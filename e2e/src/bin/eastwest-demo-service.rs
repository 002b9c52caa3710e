//! `eastwest-demo-service`: one service of the demo mesh (see
//! `eastwest_e2e::demo::service`); `eastwest-demo` starts four of them.

use eastwest_e2e::demo::service::{self, ServiceOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = ServiceOptions::parse_args(&args).and_then(service::run);
    if let Err(error) = result {
        eprintln!("eastwest-demo-service: {error:#}");
        std::process::exit(1);
    }
}
