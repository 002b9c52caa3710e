//! `eastwest-soak`: the soak that `cargo xtask soak` runs (see `eastwest_e2e::soak`). Prints
//! progress and a summary, writes report.html, soak.json and summary.txt into the output
//! directory. Exits 0 when the run passed, 1 when it failed or could not run, 2 on bad
//! arguments, 130 when Ctrl-C cut it short.

use eastwest_e2e::demo::signal;
use eastwest_e2e::soak::{self, SoakOptions};

fn main() {
    signal::install();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match SoakOptions::parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{}", soak::USAGE);
            return;
        }
        Err(error) => {
            eprintln!("eastwest-soak: {error:#}");
            std::process::exit(2);
        }
    };
    let record = match soak::run(&options) {
        Ok(record) => record,
        Err(error) => {
            eprintln!("eastwest-soak: {error:#}");
            std::process::exit(1);
        }
    };
    let verdict = soak::judge(&record);
    let summary = soak::summary_text(&record, &verdict);
    println!("\n{summary}");
    let writes = [
        ("summary.txt", summary.clone()),
        (
            "soak.json",
            serde_json::to_string_pretty(&soak::record_json(&record, &verdict)).unwrap_or_default(),
        ),
        ("report.html", soak::report_html(&record, &verdict)),
    ];
    for (name, contents) in writes {
        let path = options.out_dir.join(name);
        if let Err(error) = std::fs::write(&path, contents) {
            eprintln!("eastwest-soak: cannot write {}: {error}", path.display());
            std::process::exit(1);
        }
    }
    let report = options.out_dir.join("report.html");
    println!(
        "Report: {}",
        std::fs::canonicalize(&report).unwrap_or(report).display()
    );
    if record.interrupted {
        std::process::exit(130);
    }
    if !verdict.passed() {
        std::process::exit(1);
    }
}
