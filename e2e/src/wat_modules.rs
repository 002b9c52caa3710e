//! Tiny proxy-wasm modules written in WAT, for tests and benchmarks that need a Wasm filter
//! whose every instruction is known (no SDK, no allocator beyond a bump pointer).

/// `proxy_on_memory_allocate` as a bump allocator over the module's memory (never frees; the
/// modules live for one test or benchmark). Expects a mutable global `$heap`.
pub const BUMP_ALLOCATOR: &str = r#"
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow
        (i32.add (i32.shr_u (local.get $size) (i32.const 16)) (i32.const 1))))))
    (local.get $at))
"#;

/// A proxy-wasm module (ABI 0.2.1) that does nothing but let Envoy create and destroy its
/// contexts: the cost floor of any Wasm filter in Envoy.
pub fn noop_module() -> anyhow::Result<Vec<u8>> {
    let text = format!(
        r#"
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  {BUMP_ALLOCATOR}
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
)"#
    );
    Ok(wat::parse_str(text)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_noop_module_is_a_wasm_binary() {
        let module = super::noop_module().unwrap();
        assert!(
            module.starts_with(b"\0asm\x01\0\0\0"),
            "wasm magic and version 1"
        );
    }
}
