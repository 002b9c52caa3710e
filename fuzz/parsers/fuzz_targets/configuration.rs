//! Every module's configuration parser: any bytes are accepted or refused with a field path,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = eastwest_label_enrich::config::Settings::parse(data);
    let _ = eastwest_telemetry::config::Settings::parse(data);
    let _ = eastwest_retry_budget::config::Settings::parse(data);
    let _ = eastwest_sidecar::config::Settings::parse(data);
});
