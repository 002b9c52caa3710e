# Regenerates probe.wat: python3 harness/probe/generate.py
# Generates harness/probe/probe.wat: every probe is "label=status[:value];".
strings = {}
addr = [1024]
def s(text):
    b = text.replace('|', '\0').encode('latin1')
    if text not in strings:
        strings[text] = (addr[0], len(b), b)
        addr[0] += len(b) + 1
    a, n, _ = strings[text]
    return f"(i32.const {a}) (i32.const {n})"
def lab(label):
    a, n = s(label + "=").split(") (")
    return f"(call $emit {s(label + '=')})"
probes = []
import struct
_p = [(b':path', b'/'), (b':method', b'GET'), (b':authority', b'a')]
PAIRS = (struct.pack('<I', len(_p)) + b''.join(struct.pack('<II', len(k), len(v)) for k, v in _p) + b''.join(k + b'\0' + v + b'\0' for k, v in _p)).decode('latin1')
def P(label, call, extra=""):
    probes.append(f"    ;; {label}\n    (call $reset)\n    {lab(label)}\n    (call $num {call})\n{extra}    (call $emit {s(';')})")
V = "    (call $value)\n"
P("log_bad_level", f"(call $log (i32.const 9) {s('x')})")
P("log_level", "(call $get_log_level (i32.const 400))", "    (call $emit_u32 (i32.const 400))\n")
P("shared_get_missing", f"(call $get_shared {s('probe.k')} (i32.const 300) (i32.const 304) (i32.const 308))")
P("shared_set", f"(call $set_shared {s('probe.k')} {s('a')} (i32.const 0))")
P("shared_set_stale", f"(call $set_shared {s('probe.k')} {s('b')} (i32.const 123456))")
P("shared_get", f"(call $get_shared {s('probe.k')} (i32.const 300) (i32.const 304) (i32.const 308))", V)
P("shared_set_cas", f"(call $set_shared {s('probe.k')} {s('c')} (i32.load (i32.const 308)))")
P("prop_node_top_level", f"(call $get_property {s('node')} (i32.const 300) (i32.const 304))")
P("prop_direction_top_level", f"(call $get_property {s('listener_direction')} (i32.const 300) (i32.const 304))")
P("prop_app", f"(call $get_property {s('xds|node|metadata|LABELS|app')} (i32.const 300) (i32.const 304))", V)
P("prop_namespace", f"(call $get_property {s('xds|node|metadata|NAMESPACE')} (i32.const 300) (i32.const 304))", V)
P("prop_region", f"(call $get_property {s('xds|node|locality|region')} (i32.const 300) (i32.const 304))", V)
P("prop_node_id", f"(call $get_property {s('xds|node|id')} (i32.const 300) (i32.const 304))", V)
P("prop_direction", f"(call $get_property {s('xds|listener_direction')} (i32.const 300) (i32.const 304))", "    (call $emit_first_u32)\n")
P("prop_unknown_field", f"(call $get_property {s('xds|node|nope')} (i32.const 300) (i32.const 304))")
P("prop_unknown", f"(call $get_property {s('no_such_attribute')} (i32.const 300) (i32.const 304))")
P("set_prop", f"(call $set_property {s('probe.key')} {s('v1')})")
P("get_prop", f"(call $get_property {s('probe.key')} (i32.const 300) (i32.const 304))", V)
P("counter_define", f"(call $define (i32.const 0) {s('probe_total')} (i32.const 410))", "    (call $emit_u32 (i32.const 410))\n")
P("counter_inc_zero", "(call $increment (i32.load (i32.const 410)) (i64.const 0))")
P("counter_inc_negative", "(call $increment (i32.load (i32.const 410)) (i64.const -1))")
P("counter_inc", "(call $increment (i32.load (i32.const 410)) (i64.const 2))")
P("counter_record", "(call $record (i32.load (i32.const 410)) (i64.const 3))")
P("counter_get", "(call $get_metric (i32.load (i32.const 410)) (i32.const 420))", "    (call $emit_u32 (i32.const 420))\n")
P("histogram_define", f"(call $define (i32.const 2) {s('probe_hist')} (i32.const 430))", "    (call $emit_u32 (i32.const 430))\n")
P("histogram_get", "(call $get_metric (i32.load (i32.const 430)) (i32.const 420))")
P("histogram_record", "(call $record (i32.load (i32.const 430)) (i64.const 7))")
P("histogram_increment", "(call $increment (i32.load (i32.const 430)) (i64.const 1))")
P("gauge_define", f"(call $define (i32.const 1) {s('probe_gauge')} (i32.const 440))", "    (call $emit_u32 (i32.const 440))\n")
P("gauge_inc", "(call $increment (i32.load (i32.const 440)) (i64.const 5))")
P("gauge_dec", "(call $increment (i32.load (i32.const 440)) (i64.const -2))")
P("gauge_get", "(call $get_metric (i32.load (i32.const 440)) (i32.const 420))", "    (call $emit_u32 (i32.const 420))\n")
P("metric_unknown", "(call $increment (i32.const 4000) (i64.const 1))")
P("metric_bad_type", f"(call $define (i32.const 7) {s('probe_bad')} (i32.const 450))")
P("hdr_get_missing", f"(call $get_header (i32.const 0) {s('x-missing')} (i32.const 300) (i32.const 304))")
P("hdr_get_method", f"(call $get_header (i32.const 0) {s(':method')} (i32.const 300) (i32.const 304))", V)
P("hdr_get_case", f"(call $get_header (i32.const 0) {s('X-Probe-In')} (i32.const 300) (i32.const 304))", V)
P("hdr_response_during_request", f"(call $get_header (i32.const 2) {s('x')} (i32.const 300) (i32.const 304))")
P("hdr_bad_map", f"(call $get_header (i32.const 9) {s('x')} (i32.const 300) (i32.const 304))")
P("hdr_add", f"(call $add_header (i32.const 0) {s('x-probe')} {s('1')})")
P("hdr_add_again", f"(call $add_header (i32.const 0) {s('x-probe')} {s('2')})")
P("hdr_get_first", f"(call $get_header (i32.const 0) {s('x-probe')} (i32.const 300) (i32.const 304))", V)
P("hdr_replace", f"(call $replace_header (i32.const 0) {s('x-probe')} {s('3')})")
P("hdr_get_replaced", f"(call $get_header (i32.const 0) {s('x-probe')} (i32.const 300) (i32.const 304))", V)
P("hdr_remove", f"(call $remove_header (i32.const 0) {s('x-probe')})")
P("hdr_get_removed", f"(call $get_header (i32.const 0) {s('x-probe')} (i32.const 300) (i32.const 304))")
P("hdr_add_response_during_request", f"(call $add_header (i32.const 2) {s('x-probe')} {s('1')})")
P("buf_plugin_config", "(call $get_buffer (i32.const 7) (i32.const 0) (i32.const 100) (i32.const 300) (i32.const 304))")
P("buf_vm_config", "(call $get_buffer (i32.const 6) (i32.const 0) (i32.const 100) (i32.const 300) (i32.const 304))", V)
P("buf_bad_type", "(call $get_buffer (i32.const 99) (i32.const 0) (i32.const 100) (i32.const 300) (i32.const 304))")
P("buf_http_call_body", "(call $get_buffer (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 300) (i32.const 304))")
P("foreign_unknown", f"(call $foreign {s('no_such_function')} (i32.const 0) (i32.const 0) (i32.const 300) (i32.const 304))")
P("http_unknown_cluster", f"(call $http_call {s('no_such_cluster')} {s(PAIRS)} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 460))")
P("effective_unknown", "(call $effective (i32.const 999))")
P("done_not_pending", "(call $done)")
P("queue_resolve_missing", f"(call $resolve_queue {s('probe')} {s('no_such_queue')} (i32.const 470))")
P("queue_register", f"(call $register_queue {s('probe.q')} (i32.const 470))")
P("queue_dequeue_empty", "(call $dequeue (i32.load (i32.const 470)) (i32.const 300) (i32.const 304))")
P("queue_enqueue", f"(call $enqueue (i32.load (i32.const 470)) {s('item')})")
P("queue_dequeue", "(call $dequeue (i32.load (i32.const 470)) (i32.const 300) (i32.const 304))", V)
P("queue_dequeue_unknown", "(call $dequeue (i32.const 9999) (i32.const 300) (i32.const 304))")
P("continue_bad_type", "(call $continue (i32.const 9))")
P("close_bad_type", "(call $close (i32.const 9))")
P("time", "(call $now (i32.const 480))")
P("tick_period", "(call $tick_period (i32.const 0))")

imports = """  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_log_level" (func $get_log_level (param i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $record (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_header (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_done" (func $done (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $resolve_queue (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register_queue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick_period (param i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
"""
def esc(b):
    out = ""
    for c in b:
        if 32 <= c < 127 and chr(c) not in '\\"':
            out += chr(c)
        else:
            out += "\\%02x" % c
    return out
data = "\n".join('  (data (i32.const %d) "%s")' % (a, esc(b)) for (a, n, b) in strings.values())
PROBES = chr(10).join(probes)
wat = f""";; The probe filter: on every request it calls each host function the proxy-wasm ABI offers an
;; HTTP filter, with good and bad arguments, and answers with a local reply whose body lists
;; what came back ("label=status[:value];", status 0 Ok, 1 NotFound, 2 BadArgument, ...).
;; The same requests run in the harness and in real Envoy; their bodies must be equal.
;; Generated; hand edits are fine (the test reads this file).
(module
{imports}  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $out (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $p))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $emit (param $p i32) (param $n i32)
    (memory.copy (i32.add (i32.const 32768) (global.get $out)) (local.get $p) (local.get $n))
    (global.set $out (i32.add (global.get $out) (local.get $n))))
  (func $num (param $v i32)
    (local $i i32) (local $x i32)
    (local.set $i (i32.const 7020))
    (local.set $x (local.get $v))
    (loop $digits
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (local.get $i) (i32.add (i32.const 48) (i32.rem_u (local.get $x) (i32.const 10))))
      (local.set $x (i32.div_u (local.get $x) (i32.const 10)))
      (br_if $digits (local.get $x)))
    (call $emit (local.get $i) (i32.sub (i32.const 7020) (local.get $i))))
  (func $colon (i32.store8 (i32.const 7100) (i32.const 58)) (call $emit (i32.const 7100) (i32.const 1)))
  (func $reset (i32.store (i32.const 300) (i32.const 0)) (i32.store (i32.const 304) (i32.const 0)))
  (func $value (call $colon) (call $emit (i32.load (i32.const 300)) (i32.load (i32.const 304))))
  (func $emit_u32 (param $p i32) (call $colon) (call $num (i32.load (local.get $p))))
  (func $emit_first_u32 (call $colon) (if (i32.ge_u (i32.load (i32.const 304)) (i32.const 4)) (then (call $num (i32.load (i32.load (i32.const 300)))))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32) (param i32) (result i32)
    (global.set $out (i32.const 0))
{PROBES}
    (drop (call $local (i32.const 200) {s('probe')} (i32.const 32768) (global.get $out) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
{data}
)
"""
open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'probe.wat'), 'w').write(wat)
print(len(probes), "probes")
