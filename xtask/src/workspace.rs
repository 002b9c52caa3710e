//! Where things are in the workspace, and the little parsing of its files xtask needs.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{bail, Context, Result};

pub const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// The other target an SDK example filter may ask for (WASI preview1 builds).
pub const WASI_TARGET: &str = "wasm32-wasip1";

/// `filters/common` is the shared library, not a filter with its own module.
const SHARED_LIBRARY_DIR: &str = "common";

pub struct Workspace {
    pub root: PathBuf,
}

/// A filter crate: `filters/<name>/`, package `eastwest-<name>`, module `dist/<module>.wasm`
/// (`module` is `<name>` unless the manifest says `[package.metadata.eastwest] module = "..."`,
/// as the sidecar's does: `dist/eastwest.wasm`).
#[derive(Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub package: String,
    pub module: String,
    /// It links other filters with their `embedded` feature (the one-module sidecar), so it is
    /// built in a cargo invocation of its own: in the same one, feature unification would take
    /// the entry point out of the separate modules.
    pub embeds_filters: bool,
    /// The proxy-wasm callbacks it implements (`[package.metadata.eastwest] callbacks`): the
    /// build removes the other stream callbacks from its exports; `None`: it keeps them all.
    pub callbacks: Option<Vec<String>>,
}

/// A small filter written the way proxy-wasm SDK users write them, used only to test the
/// harness against Envoy: `harness/sdk-filters/<name>/`, package `sdk-<name>`, module
/// `target/sdk-filters/<name>.wasm`, built for the target in its
/// `[package.metadata.sdk-filter] target = "..."` (default wasm32-unknown-unknown).
#[derive(Debug, PartialEq, Eq)]
pub struct SdkFilter {
    pub name: String,
    pub package: String,
    pub target: String,
}

/// A crate under `filters/` (filter or shared library) whose unit tests also run on wasm32.
#[derive(Debug, PartialEq, Eq)]
pub struct WasmTestedCrate {
    pub package: String,
}

impl Workspace {
    pub fn locate() -> Self {
        // xtask lives at <workspace>/xtask; `cargo xtask` always runs it from source.
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .expect("xtask is a member directory of the workspace")
            .to_path_buf();
        Workspace { root }
    }

    pub fn filters_dir(&self) -> PathBuf {
        self.root.join("filters")
    }

    pub fn sdk_filters_dir(&self) -> PathBuf {
        self.root.join("harness").join("sdk-filters")
    }

    /// Where the SDK example filters' modules go: `<workspace>/target/sdk-filters/` (where the
    /// tests look, whatever `CARGO_TARGET_DIR` says), not dist/: they are test inputs, not part
    /// of the product.
    pub fn sdk_filters_out_dir(&self) -> PathBuf {
        self.root.join("target").join("sdk-filters")
    }

    pub fn dist_dir(&self) -> PathBuf {
        self.root.join("dist")
    }

    /// Project-local tools and downloads (Envoy, wasm-bindgen-cli); git-ignored.
    pub fn local_tools_dir(&self) -> PathBuf {
        self.root.join(".eastwest")
    }

    pub fn filters(&self) -> Result<Vec<Filter>> {
        discover_filters(&self.filters_dir())
    }

    pub fn sdk_filters(&self) -> Result<Vec<SdkFilter>> {
        discover_sdk_filters(&self.sdk_filters_dir())
    }

    pub fn wasm_tested_crates(&self) -> Result<Vec<WasmTestedCrate>> {
        discover_wasm_tested_crates(&self.filters_dir())
    }

    /// Cargo's target directory, honouring `CARGO_TARGET_DIR`.
    pub fn target_dir(&self) -> PathBuf {
        std::env::var_os("CARGO_TARGET_DIR")
            .filter(|dir| !dir.is_empty())
            .map(|dir| self.root.join(dir)) // join keeps an absolute dir as it is
            .unwrap_or_else(|| self.root.join("target"))
    }

    /// Where cargo puts release wasm artifacts for the filters' target.
    pub fn wasm_release_dir(&self) -> PathBuf {
        self.release_dir(WASM_TARGET)
    }

    /// Where cargo puts release artifacts for `target`.
    pub fn release_dir(&self, target: &str) -> PathBuf {
        self.target_dir().join(target).join("release")
    }

    pub fn cargo_lock(&self) -> Result<String> {
        let path = self.root.join("Cargo.lock");
        fs::read_to_string(&path).context(format!("reading {}", path.display()))
    }
}

impl Filter {
    /// The file cargo writes for this filter: a cdylib named after the package.
    pub fn artifact_file_name(&self) -> String {
        format!("{}.wasm", self.package.replace('-', "_"))
    }

    pub fn dist_file_name(&self) -> String {
        format!("{}.wasm", self.module)
    }
}

/// Crate directories directly under `filters_dir`, each with its manifest text, sorted by name.
fn crate_dirs(filters_dir: &Path) -> Result<Vec<(String, PathBuf, String)>> {
    let entries =
        fs::read_dir(filters_dir).context(format!("listing {}", filters_dir.display()))?;
    let mut crates = Vec::new();
    for entry in entries {
        let entry = entry.context(format!("listing {}", filters_dir.display()))?;
        let manifest_path = entry.path().join("Cargo.toml");
        if !manifest_path.is_file() {
            continue;
        }
        let manifest = fs::read_to_string(&manifest_path)
            .context(format!("reading {}", manifest_path.display()))?;
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        crates.push((dir_name, manifest_path, manifest));
    }
    crates.sort();
    Ok(crates)
}

pub fn discover_filters(filters_dir: &Path) -> Result<Vec<Filter>> {
    let mut filters = Vec::new();
    for (name, manifest_path, manifest) in crate_dirs(filters_dir)? {
        if name == SHARED_LIBRARY_DIR {
            continue;
        }
        let expected = format!("eastwest-{name}");
        match package_name(&manifest) {
            Some(package) if package == expected => filters.push(Filter {
                module: table_value(&manifest, "[package.metadata.eastwest]", "module")
                    .unwrap_or_else(|| name.clone()),
                embeds_filters: manifest.contains(r#"features = ["embedded"]"#),
                callbacks: crate::exports::declared_callbacks(&manifest),
                name,
                package,
            }),
            found => bail!(
                "{} names the package {:?}, but a filter in filters/{name}/ must be named \
                 {expected:?} (docs: DESIGN.md, section 2): rename the package or the directory",
                manifest_path.display(),
                found.unwrap_or_default(),
            ),
        }
    }
    Ok(filters)
}

pub fn discover_sdk_filters(sdk_filters_dir: &Path) -> Result<Vec<SdkFilter>> {
    if !sdk_filters_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut filters = Vec::new();
    for (name, manifest_path, manifest) in crate_dirs(sdk_filters_dir)? {
        let expected = format!("sdk-{name}");
        if package_name(&manifest).as_deref() != Some(expected.as_str()) {
            bail!(
                "{} must name the package {expected:?} (SDK example filters are \
                 harness/sdk-filters/<name>/, package sdk-<name>)",
                manifest_path.display()
            );
        }
        let target = table_value(&manifest, "[package.metadata.sdk-filter]", "target")
            .unwrap_or_else(|| WASM_TARGET.to_owned());
        if target != WASM_TARGET && target != WASI_TARGET {
            bail!(
                "{}: target {target:?} is neither {WASM_TARGET} nor {WASI_TARGET}",
                manifest_path.display()
            );
        }
        filters.push(SdkFilter {
            name,
            package: expected,
            target,
        });
    }
    Ok(filters)
}

impl SdkFilter {
    /// The file cargo writes for this filter: a cdylib named after the package.
    pub fn artifact_file_name(&self) -> String {
        format!("{}.wasm", self.package.replace('-', "_"))
    }
}

pub fn discover_wasm_tested_crates(filters_dir: &Path) -> Result<Vec<WasmTestedCrate>> {
    let mut crates = Vec::new();
    for (_, manifest_path, manifest) in crate_dirs(filters_dir)? {
        if !manifest.contains("wasm-bindgen-test") {
            continue;
        }
        let Some(package) = package_name(&manifest) else {
            bail!("{} has no [package] name", manifest_path.display());
        };
        crates.push(WasmTestedCrate { package });
    }
    Ok(crates)
}

/// `name` from the `[package]` table of a Cargo.toml; enough TOML for the manifests we write.
pub fn package_name(manifest: &str) -> Option<String> {
    table_value(manifest, "[package]", "name")
}

/// The string value of `key` in the table headed `table` (e.g. `[package]`) of a Cargo.toml.
fn table_value(manifest: &str, table: &str, key: &str) -> Option<String> {
    let mut in_table = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_table = line == table;
        } else if in_table {
            if let Some(value) = key_value(line, key) {
                return Some(value.to_owned());
            }
        }
    }
    None
}

/// Every version of `crate_name` recorded in a Cargo.lock, in file order.
pub fn locked_versions(cargo_lock: &str, crate_name: &str) -> Vec<String> {
    let mut versions = Vec::new();
    for package in cargo_lock.split("[[package]]").skip(1) {
        let mut name = None;
        let mut version = None;
        for line in package.lines().map(str::trim) {
            name = name.or_else(|| key_value(line, "name"));
            version = version.or_else(|| key_value(line, "version"));
        }
        if name == Some(crate_name) {
            if let Some(version) = version {
                versions.push(version.to_owned());
            }
        }
    }
    versions
}

/// The string value of `key = "value"`, if `line` is that key.
fn key_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line
        .strip_prefix(key)?
        .trim_start()
        .strip_prefix('=')?
        .trim();
    rest.strip_prefix('"')?.split('"').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn package_name_is_read_from_the_package_table_only() {
        let manifest = r#"
[workspace]
name = "not-this"

[package]
version = "0.1.0"
name    = "eastwest-label-enrich"

[dependencies]
name = "nor-this"
"#;
        assert_eq!(
            package_name(manifest).as_deref(),
            Some("eastwest-label-enrich")
        );
        assert_eq!(package_name("[dependencies]\nname = \"x\"\n"), None);
    }

    #[test]
    fn locked_versions_finds_the_exact_crate() {
        let lock = r#"
version = 4

[[package]]
name = "wasm-bindgen-test"
version = "0.3.50"

[[package]]
name = "wasm-bindgen"
version = "0.2.100"
source = "registry+https://github.com/rust-lang/crates.io-index"
dependencies = [
 "cfg-if",
]

[[package]]
name = "wasm-bindgen-macro"
version = "0.2.100"
"#;
        assert_eq!(locked_versions(lock, "wasm-bindgen"), vec!["0.2.100"]);
        assert!(locked_versions(lock, "serde").is_empty());
    }

    #[test]
    fn filters_are_the_crate_dirs_except_common() {
        let dir = TempDir::new("filters");
        dir.write(
            "label-enrich/Cargo.toml",
            "[package]\nname = \"eastwest-label-enrich\"\n",
        );
        dir.write(
            "retry-budget/Cargo.toml",
            "[package]\nname = \"eastwest-retry-budget\"\n[target.'cfg(target_arch = \"wasm32\")'.dev-dependencies]\nwasm-bindgen-test.workspace = true\n",
        );
        dir.write(
            "common/Cargo.toml",
            "[package]\nname = \"eastwest-common\"\n[dev-dependencies]\nwasm-bindgen-test = \"0.3\"\n",
        );
        dir.write(
            "sidecar/Cargo.toml",
            "[package]\nname = \"eastwest-sidecar\"\n[package.metadata.eastwest]\nmodule = \"eastwest\"\n[dependencies]\neastwest-label-enrich = { path = \"../label-enrich\", features = [\"embedded\"] }\n",
        );
        dir.write("telemetry/README.md", "not a crate yet\n");
        dir.write("notes.txt", "a file, not a directory\n");

        let filters = discover_filters(dir.path()).unwrap();
        assert_eq!(
            filters,
            vec![
                Filter {
                    name: "label-enrich".into(),
                    package: "eastwest-label-enrich".into(),
                    module: "label-enrich".into(),
                    embeds_filters: false,
                    callbacks: None,
                },
                Filter {
                    name: "retry-budget".into(),
                    package: "eastwest-retry-budget".into(),
                    module: "retry-budget".into(),
                    embeds_filters: false,
                    callbacks: None,
                },
                Filter {
                    name: "sidecar".into(),
                    package: "eastwest-sidecar".into(),
                    module: "eastwest".into(),
                    embeds_filters: true,
                    callbacks: None,
                },
            ]
        );
        assert_eq!(filters[2].dist_file_name(), "eastwest.wasm");
        assert_eq!(
            filters[1].artifact_file_name(),
            "eastwest_retry_budget.wasm"
        );
        assert_eq!(filters[1].dist_file_name(), "retry-budget.wasm");

        let wasm_tested: Vec<_> = discover_wasm_tested_crates(dir.path())
            .unwrap()
            .into_iter()
            .map(|c| c.package)
            .collect();
        assert_eq!(
            wasm_tested,
            vec!["eastwest-common", "eastwest-retry-budget"]
        );
    }

    #[test]
    fn sdk_filters_are_built_for_their_declared_target() {
        let dir = TempDir::new("sdk-filters");
        dir.write(
            "tick-counter/Cargo.toml",
            "[package]\nname = \"sdk-tick-counter\"\n",
        );
        dir.write(
            "configured-header/Cargo.toml",
            "[package]\nname = \"sdk-configured-header\"\n\n[package.metadata.sdk-filter]\ntarget = \"wasm32-wasip1\"\n",
        );
        let filters = discover_sdk_filters(dir.path()).unwrap();
        assert_eq!(
            filters,
            vec![
                SdkFilter {
                    name: "configured-header".into(),
                    package: "sdk-configured-header".into(),
                    target: WASI_TARGET.into(),
                },
                SdkFilter {
                    name: "tick-counter".into(),
                    package: "sdk-tick-counter".into(),
                    target: WASM_TARGET.into(),
                },
            ]
        );
        assert_eq!(
            filters[0].artifact_file_name(),
            "sdk_configured_header.wasm"
        );

        dir.write("bad/Cargo.toml", "[package]\nname = \"bad\"\n");
        let error = discover_sdk_filters(dir.path()).unwrap_err().to_string();
        assert!(error.contains("\"sdk-bad\""), "{error}");
    }

    #[test]
    fn a_filter_with_the_wrong_package_name_is_an_error() {
        let dir = TempDir::new("filters-misnamed");
        dir.write("telemetry/Cargo.toml", "[package]\nname = \"telemetry\"\n");
        let error = discover_filters(dir.path()).unwrap_err().to_string();
        assert!(error.contains("\"eastwest-telemetry\""), "{error}");
    }
}
