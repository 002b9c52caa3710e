//! Loading a module for the fuzzer: its linear memory gets a maximum, so that a filter whose
//! memory grows without bound (a leak, an unbounded table) fails to allocate and traps inside
//! the run instead of going unnoticed.

use std::path::Path;

use wasmparser::{Parser, Payload};

use crate::configs::FuzzConfig;

/// Each VM's linear memory may grow to 32 MiB (the modules start at about 1 MiB). The caps the
/// configurations use (up to 10,000 series or budgets per VM, the label memos) fit well within.
pub const MEMORY_CAP_PAGES: u64 = 512;

/// Every module of `config`, in chain order, memory capped.
pub fn load(dist: &Path, config: &FuzzConfig, cap_pages: u64) -> Result<Vec<Vec<u8>>, String> {
    config
        .modules()
        .into_iter()
        .map(|module| {
            let path = dist.join(format!("{module}.wasm"));
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            cap_memory(&bytes, cap_pages).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

/// The module with every memory's maximum set to `max_pages` (or its initial size, if larger).
pub fn cap_memory(wasm: &[u8], max_pages: u64) -> Result<Vec<u8>, String> {
    let mut module = wasm_encoder::Module::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| e.to_string())?;
        match payload {
            Payload::MemorySection(reader) => {
                let mut memories = wasm_encoder::MemorySection::new();
                for memory in reader {
                    let memory = memory.map_err(|e| e.to_string())?;
                    memories.memory(wasm_encoder::MemoryType {
                        minimum: memory.initial,
                        maximum: Some(
                            memory
                                .maximum
                                .unwrap_or(u64::MAX)
                                .min(max_pages)
                                .max(memory.initial),
                        ),
                        memory64: memory.memory64,
                        shared: memory.shared,
                        page_size_log2: memory.page_size_log2,
                    });
                }
                module.section(&memories);
            }
            other => {
                if let Some((id, range)) = other.as_section() {
                    module.section(&wasm_encoder::RawSection {
                        id,
                        data: &wasm[range],
                    });
                }
            }
        }
    }
    Ok(module.finish())
}
