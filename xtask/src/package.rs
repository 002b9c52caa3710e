//! `cargo xtask package`: each filter as an OCI image in an OCI image layout directory,
//! `dist/oci/<filter>/`, in the form Istio's Wasm image fetcher reads (`oci://` urls of a
//! `WasmPlugin`).
//!
//! The image is the *compat* variant of the Wasm image specification (solo-io/wasm
//! `spec/spec-compat.md`), which Istio's `pkg/wasm/imagefetcher.go` accepts for an OCI
//! manifest: its last (here: only) layer has the media type
//! `application/vnd.oci.image.layer.v1.tar+gzip`, and is a gzipped tar holding a file named
//! `plugin.wasm`, the module. The manifest carries the annotation
//! `module.wasm.image/variant: compat` that the specification asks for.
//!
//! The output is deterministic: fixed tar header fields (mtime 0, uid/gid 0, mode 0644), a
//! gzip header without a timestamp, and JSON written in a fixed order, so two runs over the
//! same module give byte-identical blobs and the same digests.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::build;
use crate::error::{bail, Context, Result};
use crate::workspace::Workspace;

pub const HELP: &str = "\
cargo xtask package [--skip-build] [--out DIR] [--tag TAG] [--registry REPO]

Builds the filters (as `cargo xtask build`), then writes each one as an OCI image in an OCI
image layout directory, DIR/<filter>/ (default dist/oci/<filter>/): `oci-layout`,
`index.json` (one manifest, tagged TAG), `blobs/sha256/...`. The image is the \"compat\"
variant of the Wasm image specification that Istio's WasmPlugin `oci://` urls fetch: one
layer, application/vnd.oci.image.layer.v1.tar+gzip, whose tar holds plugin.wasm (the module
from dist/<filter>.wasm, byte for byte). Running it twice gives the same digests.

For each filter it prints the layout directory, the manifest and layer digests, the commands
that push the image with oras, skopeo or crane, and the `url` and `sha256` to put in the
WasmPlugin.

Options:
  --skip-build     package the modules already in dist/ (from `cargo xtask build`)
  --out DIR        where the layouts go, relative to the workspace root (default
                   dist/oci); DIR/<filter>/ is replaced
  --tag TAG        the tag in index.json (default: the workspace version, 0.1.0)
  --registry REPO  the repository prefix used in the printed commands and urls
                   (default registry.example.com/eastwest, a placeholder)
";

pub const LAYOUT_VERSION: &str = "1.0.0";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The only layer media type of an OCI (non-Docker) manifest that Istio reads as the compat
/// variant (`extractOCIStandardImage`).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file Istio looks for in the layer (`filepath.Base(name) == "plugin.wasm"`).
pub const WASM_FILE_NAME: &str = "plugin.wasm";
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The placeholder registry of the printed commands and of the shipped WasmPlugin manifests
/// (envoy-configs/istio/); replace it with yours.
pub const DEFAULT_REGISTRY: &str = "registry.example.com/eastwest";

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub skip_build: bool,
    pub out: Option<PathBuf>,
    pub tag: String,
    pub registry: String,
}

/// The options, or `None` when help was asked for.
pub fn parse_args(args: &[String]) -> Result<Option<Options>> {
    let mut options = Options {
        skip_build: false,
        out: None,
        tag: env!("CARGO_PKG_VERSION").to_owned(),
        registry: DEFAULT_REGISTRY.to_owned(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            match args.next() {
                Some(value) if !value.is_empty() && !value.starts_with("--") => Ok(value.clone()),
                _ => bail!("`cargo xtask package {name}` needs a value\n\n{HELP}"),
            }
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--skip-build" => options.skip_build = true,
            "--out" => options.out = Some(PathBuf::from(value("--out")?)),
            "--tag" => options.tag = value("--tag")?,
            "--registry" => options.registry = value("--registry")?.trim_end_matches('/').into(),
            other => bail!("`cargo xtask package` has no option {other:?}\n\n{HELP}"),
        }
    }
    if !valid_tag(&options.tag) {
        bail!(
            "--tag {:?} is not an OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})",
            options.tag
        );
    }
    Ok(Some(options))
}

/// The OCI distribution spec's tag grammar.
fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// One packaged filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packaged {
    pub filter_name: String,
    pub layout_dir: PathBuf,
    pub tag: String,
    /// `sha256:<hex>` of the image manifest: what a registry reports, what Istio compares
    /// with a WasmPlugin's `sha256` for an `oci://` url.
    pub manifest_digest: String,
    /// `sha256:<hex>` of the gzipped tar layer.
    pub layer_digest: String,
    /// `sha256:<hex>` of the module itself: a WasmPlugin's `sha256` for an `http(s)://` url.
    pub module_digest: String,
    pub module_size: u64,
}

pub fn package(ws: &Workspace, options: &Options) -> Result<Vec<Packaged>> {
    let modules: Vec<(String, PathBuf)> = if options.skip_build {
        let filters = ws.filters()?;
        if filters.is_empty() {
            bail!(
                "no filter crates found under {}",
                ws.filters_dir().display()
            );
        }
        filters
            .iter()
            .map(|filter| {
                (
                    filter.module.clone(),
                    ws.dist_dir().join(filter.dist_file_name()),
                )
            })
            .collect()
    } else {
        build::build_wasm_modules(ws)?
            .into_iter()
            .map(|module| (module.filter_name, module.path))
            .collect()
    };
    let out = match &options.out {
        Some(dir) => ws.root.join(dir),
        None => ws.dist_dir().join("oci"),
    };
    let mut packaged = Vec::new();
    for (name, path) in &modules {
        let wasm = fs::read(path).context(format!(
            "reading {} (build it with `cargo xtask build`)",
            path.display()
        ))?;
        packaged.push(write_layout(name, &wasm, &options.tag, &out.join(name))?);
    }
    print_report(ws, &packaged, &options.registry);
    Ok(packaged)
}

/// `sha256:<hex>`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in hash {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// The uncompressed layer: a tar with one regular file, `plugin.wasm`, with fixed metadata.
pub fn layer_tar(wasm: &[u8]) -> Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut header, WASM_FILE_NAME, wasm)
        .context("writing the layer tar")?;
    builder.into_inner().context("finishing the layer tar")
}

/// gzip with no file name and mtime 0 in its header, so equal input gives equal bytes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).context("compressing the layer")?;
    encoder.finish().context("compressing the layer")
}

/// Writes `<dir>/oci-layout`, `<dir>/index.json` and `<dir>/blobs/sha256/*` for one module,
/// replacing whatever `dir` held.
pub fn write_layout(filter_name: &str, wasm: &[u8], tag: &str, dir: &Path) -> Result<Packaged> {
    if !wasm.starts_with(b"\0asm") {
        bail!(
            "the module for {filter_name} is not a WebAssembly binary (no \\0asm header); \
             Istio refuses such a module after fetching it"
        );
    }
    let tar = layer_tar(wasm)?;
    let layer = gzip(&tar)?;
    let layer_digest = digest(&layer);
    let config = image_config(&digest(&tar));
    let config_digest = digest(config.as_bytes());
    let manifest = image_manifest(
        filter_name,
        tag,
        (&config_digest, config.len()),
        (&layer_digest, layer.len()),
    );
    let manifest_digest = digest(manifest.as_bytes());
    let index = image_index(&manifest_digest, manifest.len(), tag);

    if dir.exists() {
        fs::remove_dir_all(dir).context(format!("removing the old {}", dir.display()))?;
    }
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).context(format!("creating {}", blobs.display()))?;
    let write = |path: PathBuf, bytes: &[u8]| -> Result<()> {
        fs::write(&path, bytes).context(format!("writing {}", path.display()))
    };
    for (blob_digest, bytes) in [
        (&layer_digest, layer.as_slice()),
        (&config_digest, config.as_bytes()),
        (&manifest_digest, manifest.as_bytes()),
    ] {
        write(blobs.join(hex_of(blob_digest)), bytes)?;
    }
    write(
        dir.join("oci-layout"),
        format!("{{\"imageLayoutVersion\":\"{LAYOUT_VERSION}\"}}").as_bytes(),
    )?;
    write(dir.join("index.json"), index.as_bytes())?;
    Ok(Packaged {
        filter_name: filter_name.to_owned(),
        layout_dir: dir.to_path_buf(),
        tag: tag.to_owned(),
        manifest_digest,
        layer_digest,
        module_digest: digest(wasm),
        module_size: wasm.len() as u64,
    })
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The image configuration. Nothing reads it to run the module; registries and tools expect
/// `architecture`, `os` and `rootfs.diff_ids` (the digest of the uncompressed layer).
/// `wasm`/`unknown` says what the module is: Rust's target `wasm32-unknown-unknown`.
fn image_config(diff_id: &str) -> String {
    format!(
        "{{\"architecture\":\"wasm\",\"os\":\"unknown\",\
         \"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}}}}",
        json_string(diff_id)
    )
}

fn image_manifest(
    filter_name: &str,
    tag: &str,
    (config_digest, config_size): (&str, usize),
    (layer_digest, layer_size): (&str, usize),
) -> String {
    format!(
        "{{\"schemaVersion\":2,\"mediaType\":{},\
         \"config\":{{\"mediaType\":{},\"digest\":{},\"size\":{config_size}}},\
         \"layers\":[{{\"mediaType\":{},\"digest\":{},\"size\":{layer_size},\
         \"annotations\":{{\"org.opencontainers.image.title\":{}}}}}],\
         \"annotations\":{{{}:{},\"org.opencontainers.image.title\":{},\
         \"org.opencontainers.image.version\":{},\"org.opencontainers.image.source\":{}}}}}",
        json_string(MANIFEST_MEDIA_TYPE),
        json_string(CONFIG_MEDIA_TYPE),
        json_string(config_digest),
        json_string(LAYER_MEDIA_TYPE),
        json_string(layer_digest),
        json_string(WASM_FILE_NAME),
        json_string(VARIANT_ANNOTATION),
        json_string("compat"),
        json_string(filter_name),
        json_string(tag),
        json_string(env!("CARGO_PKG_REPOSITORY")),
    )
}

fn image_index(manifest_digest: &str, manifest_size: usize, tag: &str) -> String {
    format!(
        "{{\"schemaVersion\":2,\"mediaType\":{},\"manifests\":[{{\"mediaType\":{},\
         \"digest\":{},\"size\":{manifest_size},\"annotations\":{{{}:{}}}}}]}}",
        json_string(INDEX_MEDIA_TYPE),
        json_string(MANIFEST_MEDIA_TYPE),
        json_string(manifest_digest),
        json_string(REF_NAME_ANNOTATION),
        json_string(tag),
    )
}

/// A JSON string literal (xtask has no JSON library: it is the first thing a fresh machine
/// compiles).
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn print_report(ws: &Workspace, packaged: &[Packaged], registry: &str) {
    println!();
    for p in packaged {
        let layout = p.layout_dir.strip_prefix(&ws.root).unwrap_or(&p.layout_dir);
        let layout = layout.display();
        let reference = format!("{registry}/{}:{}", p.filter_name, p.tag);
        println!("{}", p.filter_name);
        println!("  layout           {layout}/   (tag {})", p.tag);
        println!("  manifest digest  {}", p.manifest_digest);
        println!(
            "  layer digest     {}   (tar+gzip holding {WASM_FILE_NAME}, {} bytes)",
            p.layer_digest, p.module_size
        );
        println!("  push it with one of:");
        println!(
            "    oras cp --from-oci-layout {layout}:{} {reference}",
            p.tag
        );
        println!(
            "    skopeo copy oci:{layout}:{} docker://{reference}",
            p.tag
        );
        println!("    crane push {layout} {reference}");
        println!("  in the WasmPlugin (the sha256 of an oci:// url is the image manifest digest):");
        println!("    url: oci://{reference}");
        println!("    sha256: {}", hex_of(&p.manifest_digest));
        println!(
            "  served over http(s) instead, the sha256 is the module's: {}",
            hex_of(&p.module_digest)
        );
        println!();
    }
    println!(
        "After pushing, check that the registry kept the manifest digest: \
         `crane digest <reference>` or `skopeo inspect --format '{{{{.Digest}}}}' docker://<reference>`."
    );
}

#[cfg(test)]
mod tests {
    //! The layout is read back with independent code (serde_json, flate2's decoder, tar's
    //! reader), the way a registry client and Istio's fetcher read it.

    use std::collections::BTreeMap;
    use std::io::Read as _;

    use serde_json::Value;

    use super::*;
    use crate::testing::TempDir;

    fn built_modules() -> Vec<(String, Vec<u8>)> {
        let ws = Workspace::locate();
        let filters = ws.filters().unwrap();
        assert!(!filters.is_empty(), "no filters found");
        filters
            .iter()
            .map(|filter| {
                let path = ws.dist_dir().join(filter.dist_file_name());
                let wasm = fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (run `cargo xtask build`)", path.display())
                });
                (filter.module.clone(), wasm)
            })
            .collect()
    }

    fn read_json(path: &Path) -> Value {
        let text = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Reads a descriptor's blob and checks that its digest and size are the descriptor's.
    fn blob(dir: &Path, descriptor: &Value) -> std::result::Result<Vec<u8>, String> {
        let claimed = descriptor["digest"]
            .as_str()
            .ok_or("descriptor without digest")?;
        let hex = claimed
            .strip_prefix("sha256:")
            .ok_or(format!("{claimed}: not a sha256 digest"))?;
        let bytes = fs::read(dir.join("blobs/sha256").join(hex))
            .map_err(|e| format!("blob {claimed}: {e}"))?;
        let actual = digest(&bytes);
        if actual != claimed {
            return Err(format!("blob {claimed} has digest {actual}"));
        }
        if descriptor["size"].as_u64() != Some(bytes.len() as u64) {
            return Err(format!(
                "blob {claimed} is {} bytes, the descriptor says {}",
                bytes.len(),
                descriptor["size"]
            ));
        }
        Ok(bytes)
    }

    /// What Istio's image fetcher would get out of the layout: checks the layout, index,
    /// manifest, config and layer, and returns the module from the layer.
    fn fetch_like_istio(dir: &Path, tag: &str) -> std::result::Result<Vec<u8>, String> {
        let layout = read_json(&dir.join("oci-layout"));
        if layout != serde_json::json!({"imageLayoutVersion": "1.0.0"}) {
            return Err(format!("oci-layout is {layout}"));
        }
        let index = read_json(&dir.join("index.json"));
        if index["schemaVersion"] != 2 || index["mediaType"] != INDEX_MEDIA_TYPE {
            return Err(format!("index.json is {index}"));
        }
        let manifests = index["manifests"].as_array().ok_or("no manifests")?;
        let [descriptor] = manifests.as_slice() else {
            return Err(format!("{} manifests in index.json", manifests.len()));
        };
        if descriptor["mediaType"] != MANIFEST_MEDIA_TYPE {
            return Err(format!("manifest descriptor {descriptor}"));
        }
        if descriptor["annotations"][REF_NAME_ANNOTATION] != tag {
            return Err(format!("the manifest is not tagged {tag}: {descriptor}"));
        }
        let manifest: Value = serde_json::from_slice(&blob(dir, descriptor)?).unwrap();
        if manifest["schemaVersion"] != 2 || manifest["mediaType"] != MANIFEST_MEDIA_TYPE {
            return Err(format!("manifest {manifest}"));
        }
        if manifest["annotations"][VARIANT_ANNOTATION] != "compat" {
            return Err("the manifest lacks module.wasm.image/variant: compat".into());
        }
        if manifest["config"]["mediaType"] != CONFIG_MEDIA_TYPE {
            return Err(format!("config descriptor {}", manifest["config"]));
        }
        let config: Value = serde_json::from_slice(&blob(dir, &manifest["config"])?)
            .map_err(|e| format!("config: {e}"))?;
        let layers = manifest["layers"].as_array().ok_or("no layers")?;
        let [layer] = layers.as_slice() else {
            return Err(format!(
                "{} layers, the compat variant has one",
                layers.len()
            ));
        };
        if layer["mediaType"] != LAYER_MEDIA_TYPE {
            return Err(format!("layer media type {}", layer["mediaType"]));
        }
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(blob(dir, layer)?.as_slice())
            .read_to_end(&mut tar)
            .map_err(|e| format!("layer is not gzip: {e}"))?;
        if config["rootfs"]["diff_ids"] != serde_json::json!([digest(&tar)]) {
            return Err(format!("config diff_ids {}", config["rootfs"]));
        }
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut files = BTreeMap::new();
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let name = entry.path().unwrap().display().to_string();
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(format!("{name} is not a regular file"));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            files.insert(name, bytes);
        }
        match files.remove(WASM_FILE_NAME) {
            Some(wasm) if files.is_empty() => Ok(wasm),
            Some(_) => Err(format!("extra files in the layer: {:?}", files.keys())),
            None => Err(format!("no plugin.wasm in the layer: {:?}", files.keys())),
        }
    }

    fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(current) = stack.pop() {
            for entry in fs::read_dir(&current).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let relative = path.strip_prefix(dir).unwrap().display().to_string();
                    files.insert(relative, fs::read(&path).unwrap());
                }
            }
        }
        files
    }

    #[test]
    fn each_filter_becomes_an_image_istio_can_fetch() {
        let out = TempDir::new("package");
        for (name, wasm) in built_modules() {
            let dir = out.path().join(&name);
            let packaged = write_layout(&name, &wasm, "0.1.0", &dir).unwrap();
            let fetched = fetch_like_istio(&dir, "0.1.0").unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                fetched == wasm,
                "{name}: plugin.wasm differs from dist/{name}.wasm"
            );
            // The printed digests are the ones in the layout.
            let index = read_json(&dir.join("index.json"));
            assert_eq!(
                index["manifests"][0]["digest"],
                packaged.manifest_digest.as_str()
            );
            let manifest = read_json(
                &dir.join("blobs/sha256")
                    .join(hex_of(&packaged.manifest_digest)),
            );
            assert_eq!(
                manifest["layers"][0]["digest"],
                packaged.layer_digest.as_str()
            );
            assert_eq!(packaged.module_digest, digest(&wasm));
            // blobs/ holds exactly the three blobs the manifest names.
            assert_eq!(tree(&dir.join("blobs/sha256")).len(), 3, "{name}");
        }
    }

    #[test]
    fn packaging_twice_gives_the_same_digests_and_bytes() {
        let first = TempDir::new("package-first");
        let second = TempDir::new("package-second");
        for (name, wasm) in built_modules() {
            let a = write_layout(&name, &wasm, "0.1.0", &first.path().join(&name)).unwrap();
            let b = write_layout(&name, &wasm, "0.1.0", &second.path().join(&name)).unwrap();
            // Again into the same directory: the old layout is replaced, not added to.
            let c = write_layout(&name, &wasm, "0.1.0", &first.path().join(&name)).unwrap();
            assert_eq!(
                (&a.manifest_digest, &a.layer_digest),
                (&b.manifest_digest, &b.layer_digest)
            );
            assert_eq!(
                (&a.manifest_digest, &a.layer_digest),
                (&c.manifest_digest, &c.layer_digest)
            );
            assert!(
                tree(&first.path().join(&name)) == tree(&second.path().join(&name)),
                "{name}: two runs wrote different files"
            );
        }
    }

    #[test]
    fn a_different_module_or_tag_gives_a_different_manifest() {
        let out = TempDir::new("package-differs");
        let (name, wasm) = built_modules().remove(0);
        let base = write_layout(&name, &wasm, "0.1.0", &out.path().join("a")).unwrap();
        let retagged = write_layout(&name, &wasm, "0.2.0", &out.path().join("b")).unwrap();
        let mut changed = wasm.clone();
        *changed.last_mut().unwrap() ^= 1;
        let rebuilt = write_layout(&name, &changed, "0.1.0", &out.path().join("c")).unwrap();
        assert_ne!(base.manifest_digest, retagged.manifest_digest);
        assert_eq!(base.layer_digest, retagged.layer_digest);
        assert_ne!(base.layer_digest, rebuilt.layer_digest);
        assert_ne!(base.manifest_digest, rebuilt.manifest_digest);
    }

    /// The checks above can fail: a corrupted blob, a wrong tag or a second file is noticed.
    #[test]
    fn the_layout_check_notices_damage() {
        let out = TempDir::new("package-damage");
        let (name, wasm) = built_modules().remove(0);
        let dir = out.path().join(&name);
        let packaged = write_layout(&name, &wasm, "0.1.0", &dir).unwrap();
        assert!(fetch_like_istio(&dir, "0.1.0").is_ok());
        assert!(fetch_like_istio(&dir, "latest")
            .unwrap_err()
            .contains("not tagged"));

        let layer_path = dir
            .join("blobs/sha256")
            .join(hex_of(&packaged.layer_digest));
        let original = fs::read(&layer_path).unwrap();
        let mut damaged = original.clone();
        damaged[original.len() / 2] ^= 0xff;
        fs::write(&layer_path, &damaged).unwrap();
        let error = fetch_like_istio(&dir, "0.1.0").unwrap_err();
        assert!(error.contains("has digest"), "{error}");

        // A layer with a second file, written with correct digests everywhere.
        let mut builder = tar::Builder::new(Vec::new());
        for file in [WASM_FILE_NAME, "extra.txt"] {
            let mut header = tar::Header::new_ustar();
            header.set_size(wasm.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, file, wasm.as_slice())
                .unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let layer = gzip(&tar).unwrap();
        fs::remove_file(&layer_path).unwrap();
        let layer_digest = digest(&layer);
        fs::write(dir.join("blobs/sha256").join(hex_of(&layer_digest)), &layer).unwrap();
        let config = image_config(&digest(&tar));
        let config_digest = digest(config.as_bytes());
        fs::write(
            dir.join("blobs/sha256").join(hex_of(&config_digest)),
            &config,
        )
        .unwrap();
        let manifest = image_manifest(
            &name,
            "0.1.0",
            (&config_digest, config.len()),
            (&layer_digest, layer.len()),
        );
        let manifest_digest = digest(manifest.as_bytes());
        fs::write(
            dir.join("blobs/sha256").join(hex_of(&manifest_digest)),
            &manifest,
        )
        .unwrap();
        fs::write(
            dir.join("index.json"),
            image_index(&manifest_digest, manifest.len(), "0.1.0"),
        )
        .unwrap();
        let error = fetch_like_istio(&dir, "0.1.0").unwrap_err();
        assert!(error.contains("extra files"), "{error}");
    }

    #[test]
    fn the_tar_and_gzip_are_reproducible_and_minimal() {
        let tar = layer_tar(b"\0asm\x01\0\0\0").unwrap();
        let header = tar::Header::from_byte_slice(&tar[..512]);
        assert_eq!(header.mtime().unwrap(), 0);
        assert_eq!(header.uid().unwrap(), 0);
        assert_eq!(header.mode().unwrap(), 0o644);
        assert_eq!(header.path().unwrap().to_str(), Some(WASM_FILE_NAME));
        let gz = gzip(&tar).unwrap();
        // RFC 1952: bytes 4..8 are MTIME, byte 9 the OS.
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        assert_eq!(gz[9], 255);
        assert_eq!(gzip(&tar).unwrap(), gz);
    }

    #[test]
    fn refuses_what_is_not_a_wasm_module() {
        let out = TempDir::new("package-refuse");
        let error = write_layout("x", b"not wasm", "0.1.0", &out.path().join("x")).unwrap_err();
        assert!(error.to_string().contains("not a WebAssembly binary"));
    }

    #[test]
    fn options() {
        let parse =
            |args: &[&str]| parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        let defaults = parse(&[]).unwrap().unwrap();
        assert_eq!(defaults.tag, env!("CARGO_PKG_VERSION"));
        assert_eq!(defaults.registry, DEFAULT_REGISTRY);
        assert!(!defaults.skip_build);
        let given = parse(&[
            "--skip-build",
            "--out",
            "target/oci",
            "--tag",
            "v1.2.3",
            "--registry",
            "ghcr.io/me/",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            given,
            Options {
                skip_build: true,
                out: Some(PathBuf::from("target/oci")),
                tag: "v1.2.3".into(),
                registry: "ghcr.io/me".into(),
            }
        );
        assert!(parse(&["--help"]).unwrap().is_none());
        assert!(parse(&["--tag"]).is_err());
        assert!(parse(&["--tag", "has/slash"]).is_err());
        assert!(parse(&["--tag", ".dot-first"]).is_err());
        assert!(parse(&["--push"]).is_err());
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(json_string("\n"), r#""\u000a""#);
        let parsed: Value = serde_json::from_str(&image_index("sha256:00", 7, "t\"ag")).unwrap();
        assert_eq!(
            parsed["manifests"][0]["annotations"][REF_NAME_ANNOTATION],
            "t\"ag"
        );
    }
}
