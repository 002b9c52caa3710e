//! Pruning a module's exports to the proxy-wasm callbacks its filter implements.
//!
//! The Rust SDK exports every callback of the ABI and answers the ones a filter does not
//! implement with the default (`Continue`, or nothing). Envoy calls an exported callback on
//! every stream: for each one a filter does not use that is a trip into the VM (and the SDK's
//! context lookup) for nothing. When the export is absent, Envoy (proxy-wasm-cpp-host) skips
//! the call and uses exactly that default. So `cargo xtask build` removes the stream callbacks
//! a filter does not list in `[package.metadata.eastwest] callbacks` from the export section;
//! the code stays, nothing else changes.

use wasm_encoder::{ExportKind, ExportSection, Module, RawSection};
use wasmparser::{Parser, Payload};

/// Callbacks the host calls only when exported, whose absence means the SDK's default.
/// (Context creation and deletion, VM start, configuration, memory allocation and the ABI
/// version are always kept.)
pub const PRUNABLE_CALLBACKS: [&str; 23] = [
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_request_metadata",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_response_metadata",
    "proxy_on_log",
    "proxy_on_done",
    "proxy_on_http_call_response",
    "proxy_on_grpc_receive_initial_metadata",
    "proxy_on_grpc_receive_trailing_metadata",
    "proxy_on_grpc_receive",
    "proxy_on_grpc_close",
    "proxy_on_queue_ready",
    "proxy_on_tick",
    "proxy_on_new_connection",
    "proxy_on_downstream_data",
    "proxy_on_upstream_data",
    "proxy_on_downstream_connection_close",
    "proxy_on_upstream_connection_close",
    "proxy_on_foreign_function",
];

/// `wasm` with every prunable callback not in `keep` removed from its exports, and without its
/// `name` and `producers` sections; the callbacks removed, in export order.
pub fn prune_callbacks(wasm: &[u8], keep: &[String]) -> Result<(Vec<u8>, Vec<String>), String> {
    let mut module = Module::new();
    let mut removed = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| format!("not a valid Wasm module: {e}"))?;
        match payload {
            Payload::ExportSection(reader) => {
                let mut exports = ExportSection::new();
                for export in reader {
                    let export = export.map_err(|e| format!("bad export section: {e}"))?;
                    let prunable = PRUNABLE_CALLBACKS.contains(&export.name);
                    if prunable && !keep.iter().any(|name| name == export.name) {
                        removed.push(export.name.to_string());
                        continue;
                    }
                    let kind = match export.kind {
                        wasmparser::ExternalKind::Func => ExportKind::Func,
                        wasmparser::ExternalKind::Table => ExportKind::Table,
                        wasmparser::ExternalKind::Memory => ExportKind::Memory,
                        wasmparser::ExternalKind::Global => ExportKind::Global,
                        wasmparser::ExternalKind::Tag => ExportKind::Tag,
                    };
                    exports.export(export.name, kind, export.index);
                }
                module.section(&exports);
            }
            // Function names and the producers list: what `strip = true` removes, which the
            // per-package opt-levels keep rustc from doing for wasm (profile a build with names,
            // see harness/README.md).
            Payload::CustomSection(custom) if matches!(custom.name(), "name" | "producers") => {}
            other => {
                if let Some((id, range)) = other.as_section() {
                    module.section(&RawSection {
                        id,
                        data: &wasm[range],
                    });
                }
            }
        }
    }
    Ok((module.finish(), removed))
}

/// The callbacks listed as `callbacks = ["...", ...]` under `[package.metadata.eastwest]`;
/// `None` when the manifest lists none (nothing is pruned then).
pub fn declared_callbacks(manifest: &str) -> Option<Vec<String>> {
    let mut in_table = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_table = line == "[package.metadata.eastwest]";
            continue;
        }
        if !in_table {
            continue;
        }
        let Some(rest) = line.strip_prefix("callbacks") else {
            continue;
        };
        let list = rest.trim_start().strip_prefix('=')?.trim();
        let inner = list.strip_prefix('[')?.strip_suffix(']')?;
        return Some(
            inner
                .split(',')
                .map(|item| item.trim().trim_matches('"').to_string())
                .filter(|item| !item.is_empty())
                .collect(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports(wasm: &[u8]) -> Vec<String> {
        Parser::new(0)
            .parse_all(wasm)
            .filter_map(|payload| match payload.unwrap() {
                Payload::ExportSection(reader) => Some(
                    reader
                        .into_iter()
                        .map(|e| e.unwrap().name.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn removes_only_unlisted_stream_callbacks() {
        let wasm = wat::parse_str(
            r#"(module
              (memory (export "memory") 1)
              (func $f (param i32) (result i32) (i32.const 0))
              (func $g (param i32 i32 i32) (result i32) (i32.const 0))
              (export "malloc" (func $f))
              (export "proxy_on_context_create" (func $f))
              (export "proxy_on_request_headers" (func $g))
              (export "proxy_on_response_body" (func $g))
              (export "proxy_on_done" (func $f))
              (export "proxy_on_delete" (func $f))
              (@custom "name-like" "kept as it was")
              (@custom "producers" "dropped"))"#,
        )
        .unwrap();
        let keep = vec!["proxy_on_request_headers".to_string()];
        let (pruned, removed) = prune_callbacks(&wasm, &keep).unwrap();
        assert_eq!(removed, vec!["proxy_on_response_body", "proxy_on_done"]);
        assert_eq!(
            exports(&pruned),
            vec![
                "memory",
                "malloc",
                "proxy_on_context_create",
                "proxy_on_request_headers",
                "proxy_on_delete"
            ]
        );
        for payload in Parser::new(0).parse_all(&pruned) {
            payload.unwrap();
        }
        assert!(pruned
            .windows(b"kept as it was".len())
            .any(|w| w == b"kept as it was"));
        assert!(!pruned.windows(b"dropped".len()).any(|w| w == b"dropped"));
    }

    #[test]
    fn reads_the_declared_callbacks() {
        let manifest = "[package]\nname = \"x\"\n\n[package.metadata.eastwest]\nmodule = \"m\"\ncallbacks = [\"proxy_on_log\", \"proxy_on_tick\"]\n\n[lib]\n";
        assert_eq!(
            declared_callbacks(manifest),
            Some(vec![
                "proxy_on_log".to_string(),
                "proxy_on_tick".to_string()
            ])
        );
        assert_eq!(declared_callbacks("[package]\nname = \"x\"\n"), None);
    }
}
