//! The scenario format is described completely by harness/scenario.schema.json: the file is what
//! the parser's types generate (`eastwest-harness schema`), and every shipped scenario is valid
//! against it (checked by an independent JSON-schema validator) and parses.

use eastwest_harness::scenario;

const SCHEMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scenario.schema.json");
const SCENARIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");

#[test]
fn the_shipped_schema_is_the_one_the_parser_generates() {
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SCHEMA).unwrap()).unwrap();
    assert_eq!(
        shipped,
        scenario::schema(),
        "harness/scenario.schema.json is stale: run `cargo run -p eastwest-harness -- schema > harness/scenario.schema.json`"
    );
}

fn validator() -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SCHEMA).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect("a valid JSON schema")
}

#[test]
fn every_shipped_scenario_is_valid_against_the_schema_and_parses() {
    let validator = validator();
    let mut checked = 0;
    for entry in std::fs::read_dir(SCENARIOS).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let document: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&document)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} scenarios found");
}

#[test]
fn the_schema_refuses_what_the_parser_refuses() {
    let validator = validator();
    for (text, what) in [
        ("streams: [{request: {header: {}}}]", "a misspelt field"),
        ("workers: two", "a number as text"),
        ("plugins: [{config: {}}]", "a plugin without its module"),
        ("grpc_calls: {auth: {status: -1}}", "a negative gRPC status"),
    ] {
        let document: serde_json::Value = serde_yaml_ng::from_str(text).unwrap();
        assert!(!validator.is_valid(&document), "schema accepts {what}");
        assert!(scenario::parse(text).is_err(), "parser accepts {what}");
    }
}
