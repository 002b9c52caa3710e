//! The probe's answers in the harness, pinned. The e2e test `harness_agrees_with_envoy` runs the
//! same probe in real Envoy 1.40 and requires the harness's answers, entry by entry.

use eastwest_harness::probe::{entries, report_in_harness};

#[test]
fn probe_report_in_the_harness() {
    let report = report_in_harness().unwrap();
    assert_eq!(entries(&report), entries(EXPECTED));
}

/// What Envoy 1.40 answers (checked by `probe_agrees_with_envoy`).
const EXPECTED: &str = "\
    log_bad_level=2;log_level=0:2;shared_get_missing=1;shared_set=0;\
    shared_set_stale=8;shared_get=0:a;shared_set_cas=0;prop_node_top_level=1;\
    prop_direction_top_level=1;prop_app=0:cart;prop_namespace=0:shop;prop_region=0:eu-west-1;\
    prop_node_id=0:probe-node;prop_direction=0:2;prop_unknown_field=1;prop_unknown=1;\
    set_prop=0;get_prop=0:v1;counter_define=0:4;counter_inc_zero=2;\
    counter_inc_negative=2;counter_inc=0;counter_record=0;counter_get=0:5;\
    histogram_define=0:6;histogram_get=2;histogram_record=0;histogram_increment=2;\
    gauge_define=0:5;gauge_inc=0;gauge_dec=0;gauge_get=0:3;\
    metric_unknown=1;metric_bad_type=2;hdr_get_missing=1;hdr_get_method=0:GET;\
    hdr_get_case=0:in;hdr_response_during_request=2;hdr_bad_map=2;hdr_add=0;\
    hdr_add_again=0;hdr_get_first=0:1;hdr_replace=0;hdr_get_replaced=0:3;\
    hdr_remove=0;hdr_get_removed=1;hdr_add_response_during_request=2;buf_plugin_config=1;\
    buf_vm_config=0:;buf_bad_type=2;buf_http_call_body=1;foreign_unknown=1;\
    http_unknown_cluster=2;effective_unknown=2;done_not_pending=1;queue_resolve_missing=1;\
    queue_register=0;queue_dequeue_empty=7;queue_enqueue=0;queue_dequeue=0:item;\
    queue_dequeue_unknown=1;continue_bad_type=2;close_bad_type=2;time=0;\
    tick_period=0;";
