//! The profiler: exact instructions per function and stack, equal to the harness's own count.

use eastwest_harness::profile::{self, Profile, ProfileScope};
use eastwest_harness::scenario::{self, Overrides};
use eastwest_harness::{Harness, Message, Options};

/// `f` (proxy_on_request_headers) calls `g` ten times in a loop, `h` (which returns with a
/// branch to its function label) once, the host's `proxy_get_header_map_value` (which calls
/// back `malloc` for the value) and `proxy_log`, then returns with `return`.
///
/// Wasmtime charges one instruction for entering a wasm function, then one per instruction
/// except `block`, `loop`, `end`, `else`, `return`, `unreachable`, `nop` and `drop`:
/// - g: entry 1 + `local.get`, `i32.const`, `i32.add` = 4, ten times: 40;
/// - h: entry 1 + `i32.const`, `br` = 3;
/// - f: entry 1 + 10 × 7 (the loop body) + `call $h` 1 + five `i32.const` before `call $get`
///   + three before `call $log` + the last `i32.const` = 81;
/// - the calls of the host functions are their frames' instructions: 1 each;
/// - malloc: entry 1 + `i32.const` = 2.
pub const EXAMPLE_WAT: &str = r#"(module
  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) ":path")
  (func $_ZN7example1g17h0123456789abcdefE (param $x i32) (result i32)
    local.get $x
    i32.const 1
    i32.add)
  (func $h (result i32)
    i32.const 5
    br 0)
  (func $f (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    block
      loop
        local.get $i
        call $_ZN7example1g17h0123456789abcdefE
        local.set $i
        local.get $i
        i32.const 10
        i32.lt_u
        br_if 0
      end
    end
    call $h
    drop
    i32.const 0
    i32.const 100
    i32.const 5
    i32.const 200
    i32.const 204
    call $get
    drop
    i32.const 2
    i32.const 0
    i32.const 0
    call $proxy_log
    drop
    i32.const 0
    return)
  (func (export "proxy_abi_version_0_2_1"))
  (func $malloc (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;

pub const EXAMPLE_FOLDED: &str = "\
f 81
f;example::g 40
f;h 3
f;proxy_get_header_map_value 1
f;proxy_get_header_map_value;malloc 2
f;proxy_log 1
";

fn profiled(wasm: &[u8], scope: ProfileScope) -> Harness {
    Harness::new(
        wasm,
        Options {
            profile: Some(scope),
            ..Options::default()
        },
    )
    .unwrap()
}

fn one_request(wasm: &[u8], profile: Option<ProfileScope>) -> (u64, Option<Profile>) {
    let mut h = Harness::new(
        wasm,
        Options {
            profile,
            ..Options::default()
        },
    )
    .unwrap();
    let id = h.run(0, None, Message::get("/"), None);
    assert!(h.traps.is_empty(), "{:?}", h.traps);
    (h.result(id).instructions, h.profile())
}

#[test]
fn counts_every_instruction_of_a_small_module_by_stack() {
    let (instructions, profile) = one_request(EXAMPLE_WAT.as_bytes(), Some(ProfileScope::Streams));
    let profile = profile.unwrap();
    assert_eq!(profile.folded(), EXAMPLE_FOLDED);
    assert_eq!(profile.total(), 128);
    assert_eq!(instructions, 128);
    // The uninstrumented module spends exactly as much.
    assert_eq!(one_request(EXAMPLE_WAT.as_bytes(), None).0, 128);
    let callbacks = &profile.callbacks["proxy_on_request_headers"];
    assert_eq!((callbacks.calls, callbacks.instructions), (1, 128));

    let functions = profile.functions();
    let row = |name: &str| {
        let f = functions.iter().find(|f| f.name == name).unwrap();
        (f.self_instructions, f.inclusive_instructions, f.calls)
    };
    assert_eq!(functions[0].name, "f");
    assert_eq!(row("f"), (81, 128, 1));
    assert_eq!(row("example::g"), (40, 40, 10));
    assert_eq!(row("h"), (3, 3, 1));
    assert_eq!(row("proxy_get_header_map_value"), (1, 3, 1));
    assert_eq!(row("malloc"), (2, 2, 1));
    assert_eq!(row("proxy_log"), (1, 1, 1));
    let table = profile.table(3);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(
        table.contains("        81  63.3%        128 100.0%       1  f"),
        "{table}"
    );
}

#[test]
fn the_same_counts_on_every_run() {
    let first = one_request(EXAMPLE_WAT.as_bytes(), Some(ProfileScope::Streams)).1;
    let second = one_request(EXAMPLE_WAT.as_bytes(), Some(ProfileScope::Streams)).1;
    assert_eq!(first, second);
}

#[test]
fn names_come_from_the_name_section_else_imports_and_exports_else_the_index() {
    // No `$names`: no name section.
    let wat = r#"(module
      (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (result i32) (i32.const 7))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        call 1
        drop
        i32.const 2 i32.const 0 i32.const 0 call 0)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;
    let (instructions, profile) = one_request(wat.as_bytes(), Some(ProfileScope::Streams));
    assert_eq!(
        profile.unwrap().folded(),
        "proxy_on_request_headers 5\nproxy_on_request_headers;func[1] 2\n\
         proxy_on_request_headers;proxy_log 1\n"
    );
    assert_eq!(instructions, 8);
    assert_eq!(one_request(wat.as_bytes(), None).0, 8);
}

#[test]
fn several_results_tail_calls_and_a_module_without_imports() {
    let wat = r#"(module
      (memory (export "memory") 1)
      (func $pair (result i32 i32) (i32.const 1) (i32.const 2))
      (func $sum (param i32 i32) (result i32) (local.get 0) (local.get 1) (i32.add))
      (func $tail (result i32) (call $pair) (return_call $sum))
      (func $on_headers (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $tail))
        (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;
    let plain = one_request(wat.as_bytes(), None).0;
    let (instructions, profile) = one_request(wat.as_bytes(), Some(ProfileScope::Streams));
    let profile = profile.unwrap();
    assert_eq!(instructions, plain);
    assert_eq!(profile.total(), plain);
    // pair: entry + 2; tail: entry + `call` (its `return_call` is counted once it has left,
    // to on_headers); sum runs in place of tail, under on_headers.
    assert_eq!(
        profile.folded(),
        "on_headers 4\non_headers;sum 4\non_headers;tail 2\non_headers;tail;pair 3\n"
    );
}

#[test]
fn a_trap_ends_the_stack_and_the_counts_still_add_up() {
    let wat = r#"(module
      (memory (export "memory") 1)
      (func $deep (param i32) (result i32)
        (if (result i32) (i32.eqz (local.get 0))
          (then unreachable)
          (else (call $deep (i32.sub (local.get 0) (i32.const 1))))))
      (func $on_headers (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $deep (i32.const 3)))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;
    let run = |profile| {
        let mut h = Harness::new(
            wat.as_bytes(),
            Options {
                profile,
                workers: 1,
                ..Options::default()
            },
        )
        .unwrap();
        let id = h.run(0, None, Message::get("/"), None);
        assert_eq!(h.traps.len(), 1);
        (h.result(id).instructions, h.profile())
    };
    let plain = run(None).0;
    let (instructions, profile) = run(Some(ProfileScope::Streams));
    let profile = profile.unwrap();
    assert_eq!(instructions, plain);
    assert_eq!(profile.total(), plain);
    assert!(
        profile.folded().contains("on_headers;deep;deep;deep;deep "),
        "{}",
        profile.folded()
    );
}

#[test]
fn everything_also_counts_start_and_configuration() {
    let wat = r#"(module
      (memory (export "memory") 1)
      (func $busy (param i32) (loop (br_if 0 (local.tee 0 (i32.sub (local.get 0) (i32.const 1))))))
      (func (export "proxy_on_configure") (param i32 i32) (result i32) (call $busy (i32.const 5)) (i32.const 1))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $busy (i32.const 2)) (i32.const 0))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "malloc") (param i32) (result i32) (i32.const 1024)))"#;
    let mut everything = profiled(wat.as_bytes(), ProfileScope::Everything);
    let id = everything.run(0, None, Message::get("/"), None);
    let stream = everything.result(id).instructions;
    // Every VM's start: the workers', the main thread's and the base VM's.
    let startup: u64 = everything.startup_instructions.iter().sum();
    assert_eq!(everything.startup_instructions.len(), 3);
    let profile = everything.profile().unwrap();
    assert!(startup > 0 && stream > 0);
    assert_eq!(profile.total(), startup + stream);
    assert_eq!(
        profile.callbacks["proxy_on_configure"].instructions,
        startup
    );

    let mut streams = profiled(wat.as_bytes(), ProfileScope::Streams);
    streams.run(0, None, Message::get("/"), None);
    assert_eq!(streams.profile().unwrap().total(), stream);
    // After a reset only what follows counts.
    streams.reset_profile();
    assert_eq!(streams.profile().unwrap(), Profile::default());
    streams.run(0, None, Message::get("/"), None);
    assert_eq!(streams.profile().unwrap().total(), stream);
}

#[test]
fn rust_symbols_are_demangled_without_their_hash() {
    assert_eq!(
        profile::demangle("_ZN4core3fmt5write17h0123456789abcdefE"),
        "core::fmt::write"
    );
    assert_eq!(profile::demangle("malloc"), "malloc");
}

const TYPICAL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/scenarios/typical-outbound.yaml"
);

/// The profile of a real filter adds up to the harness's own count, stream by stream.
#[test]
fn the_profile_of_each_filter_in_dist_equals_the_harness_instructions() {
    let dist = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist");
    let scenario = scenario::parse(&std::fs::read_to_string(TYPICAL).unwrap()).unwrap();
    let mut checked = 0;
    for module in ["label-enrich", "telemetry", "retry-budget"] {
        let path = format!("{dist}/{module}.wasm");
        let Ok(wasm) = std::fs::read(&path) else {
            eprintln!("skipped {module}: no {path} (run `cargo xtask build`)");
            continue;
        };
        let (_, plain) = scenario::run(&wasm, &scenario, Overrides::default()).unwrap();
        let overrides = Overrides {
            profile: Some(ProfileScope::Streams),
            profile_warmup: 3,
            ..Overrides::default()
        };
        let (harness, profiled) = scenario::run(&wasm, &scenario, overrides).unwrap();
        let counts = |output: &scenario::Output| -> Vec<u64> {
            output.streams.iter().map(|s| s.instructions).collect()
        };
        assert_eq!(counts(&profiled), counts(&plain), "{module}");
        assert_eq!(profiled.startup_instructions, plain.startup_instructions);
        let profile = harness.profile().unwrap();
        assert_eq!(profile.total(), plain.streams[3].instructions, "{module}");
        let by_callback: u64 = profile.callbacks.values().map(|c| c.instructions).sum();
        assert_eq!(by_callback, profile.total());
        let folded_total: u64 = profile
            .folded()
            .lines()
            .map(|line| line.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        assert_eq!(folded_total, profile.total());
        checked += 1;
    }
    if checked == 0 {
        eprintln!("skipped: no module in {dist} (run `cargo xtask build`)");
    }
}
