//! `cargo xtask build`: every filter to wasm32 in release, copied to `dist/<filter>.wasm`; the
//! harness's SDK example filters to `target/sdk-filters/<name>.wasm`.

use std::fs;
use std::path::PathBuf;

use crate::error::{bail, Context, Result};
use crate::process::{find_on_path, Cmd};
use crate::workspace::{SdkFilter, Workspace, WASM_TARGET};

pub const HELP: &str = "\
cargo xtask build

Builds every filter under filters/ (crate eastwest-<name>) for wasm32-unknown-unknown in
release, copies each module to dist/<name>.wasm (the sidecar, all three features in one
module, to dist/eastwest.wasm) and prints the sizes. A filter whose Cargo.toml lists the
proxy-wasm callbacks it implements (`[package.metadata.eastwest] callbacks = [...]`) keeps
only those of the SDK's stream callbacks in its exports: Envoy then skips the others instead
of calling into the VM for the SDK's default answer. The separate modules build in one cargo
invocation, the sidecar in a second one (it links them with their `embedded` feature).
Then builds the harness's SDK example filters (harness/sdk-filters/<name>/, package
sdk-<name>) for their target (wasm32-unknown-unknown, or wasm32-wasip1 when the manifest says
`[package.metadata.sdk-filter] target = \"wasm32-wasip1\"`) into target/sdk-filters/<name>.wasm:
test inputs for the harness and the end-to-end tests, not shipped, not in dist/.
Adds the rustup targets first if they are missing.
";

pub struct BuiltModule {
    pub filter_name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

pub fn build(ws: &Workspace) -> Result<Vec<BuiltModule>> {
    let modules = build_wasm_modules(ws)?;
    print_size_table(&modules);
    let sdk_filters = build_sdk_filters(ws)?;
    if !sdk_filters.is_empty() {
        println!("\nSDK example filters (harness tests only, not shipped):");
        for path in sdk_filters {
            let relative = path.strip_prefix(&ws.root).unwrap_or(&path);
            println!("  {}", relative.display());
        }
    }
    Ok(modules)
}

/// Builds the SDK example filters, one cargo invocation per target, into
/// `target/sdk-filters/<name>.wasm`; returns the paths written.
fn build_sdk_filters(ws: &Workspace) -> Result<Vec<PathBuf>> {
    let filters = ws.sdk_filters()?;
    let mut targets: Vec<&str> = filters.iter().map(|f| f.target.as_str()).collect();
    targets.sort();
    targets.dedup();
    for target in &targets {
        ensure_rust_target(target)?;
        let mut cargo = Cmd::cargo()
            .args(["build", "--release", "--target", target])
            .current_dir(&ws.root);
        for filter in filters.iter().filter(|f| f.target == *target) {
            cargo = cargo.args(["-p", &filter.package]);
        }
        cargo.run()?;
    }
    let out_dir = ws.sdk_filters_out_dir();
    fs::create_dir_all(&out_dir).context(format!("creating {}", out_dir.display()))?;
    filters
        .iter()
        .map(|filter| copy_sdk_filter(ws, filter, &out_dir))
        .collect()
}

fn copy_sdk_filter(
    ws: &Workspace,
    filter: &SdkFilter,
    out_dir: &std::path::Path,
) -> Result<PathBuf> {
    let artifact = ws
        .release_dir(&filter.target)
        .join(filter.artifact_file_name());
    let path = out_dir.join(format!("{}.wasm", filter.name));
    fs::copy(&artifact, &path).context(format!(
        "copying {} to {} (the crate needs `crate-type = [\"cdylib\"]`)",
        artifact.display(),
        path.display()
    ))?;
    Ok(path)
}

pub fn build_wasm_modules(ws: &Workspace) -> Result<Vec<BuiltModule>> {
    let filters = ws.filters()?;
    if filters.is_empty() {
        bail!(
            "no filter crates found under {}: each filter lives in filters/<name>/ with a \
             Cargo.toml naming the package eastwest-<name>",
            ws.filters_dir().display()
        );
    }
    ensure_rust_target(WASM_TARGET)?;

    // The separate modules in one cargo invocation; a module that embeds them (the sidecar)
    // in its own, so that their `embedded` feature does not reach the separate modules.
    for embeds_filters in [false, true] {
        let packages: Vec<&str> = filters
            .iter()
            .filter(|filter| filter.embeds_filters == embeds_filters)
            .map(|filter| filter.package.as_str())
            .collect();
        if packages.is_empty() {
            continue;
        }
        let mut cargo = Cmd::cargo()
            .args(["build", "--release", "--target", WASM_TARGET])
            .current_dir(&ws.root);
        for package in packages {
            cargo = cargo.args(["-p", package]);
        }
        cargo.run()?;
    }

    let dist = ws.dist_dir();
    fs::create_dir_all(&dist).context(format!("creating {}", dist.display()))?;
    let release_dir = ws.wasm_release_dir();
    let mut modules = Vec::new();
    for filter in &filters {
        let artifact = release_dir.join(filter.artifact_file_name());
        if !artifact.is_file() {
            bail!(
                "cargo built {} but wrote no {}: the crate needs `crate-type = [\"cdylib\"]` \
                 under [lib] in filters/{}/Cargo.toml",
                filter.package,
                artifact.display(),
                filter.name
            );
        }
        let path = dist.join(filter.dist_file_name());
        let wasm = fs::read(&artifact).context(format!("reading {}", artifact.display()))?;
        let wasm = match &filter.callbacks {
            Some(callbacks) => {
                crate::exports::prune_callbacks(&wasm, callbacks)
                    .map_err(|e| crate::error::Error::msg(format!("{}: {e}", artifact.display())))?
                    .0
            }
            None => wasm,
        };
        fs::write(&path, wasm).context(format!("writing {}", path.display()))?;
        let size_bytes = fs::metadata(&path)
            .context(format!("reading {}", path.display()))?
            .len();
        modules.push(BuiltModule {
            filter_name: filter.module.clone(),
            path,
            size_bytes,
        });
    }
    Ok(modules)
}

/// Without the target's standard library the build fails with an obscure "can't find crate for
/// `core`", so check first and add it.
fn ensure_rust_target(target: &str) -> Result<()> {
    if find_on_path("rustup").is_none() {
        println!(
            "note: rustup is not on PATH, so xtask cannot check that the Rust standard library \
             for {target} is installed. If the build fails with \"can't find crate for \
             `core`\", add it by hand: with rustup, `rustup target add {target}`; with a \
             distribution's Rust, its wasm32 standard library package (Debian: \
             libstd-rust-dev-wasm32)."
        );
        return Ok(());
    }
    let output = Cmd::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    if !output.status.success() {
        bail!(
            "`rustup target list --installed` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let installed = String::from_utf8_lossy(&output.stdout);
    if installed.lines().any(|line| line.trim() == target) {
        return Ok(());
    }
    println!(
        "The build needs {target}, whose Rust standard library is not installed for this \
         toolchain; adding it with rustup (once)."
    );
    Cmd::new("rustup").args(["target", "add", target]).run()
}

fn print_size_table(modules: &[BuiltModule]) {
    let rows: Vec<(String, String, String)> = modules
        .iter()
        .map(|m| {
            (
                format!("dist/{}.wasm", m.filter_name),
                m.size_bytes.to_string(),
                format!("{:.1}", m.size_bytes as f64 / 1024.0),
            )
        })
        .collect();
    let name_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let bytes_width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(5);
    let kib_width = rows.iter().map(|r| r.2.len()).max().unwrap_or(0).max(3);
    println!();
    println!(
        "{:<name_width$}  {:>bytes_width$}  {:>kib_width$}",
        "module", "bytes", "KiB"
    );
    for (name, bytes, kib) in rows {
        println!("{name:<name_width$}  {bytes:>bytes_width$}  {kib:>kib_width$}");
    }
}
