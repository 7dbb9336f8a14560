//! Property tests: the parser never panics, whatever the input, and reports errors with
//! document indices inside the input.

use biplane_api::parse_documents;
use proptest::prelude::*;

const FIXTURE: &str = include_str!("data/all-kinds.yaml");

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings_never_panic(s in "\\PC{0,400}") {
        let _ = parse_documents(&s);
    }

    #[test]
    fn yamlish_strings_never_panic(s in "(apiVersion|kind|metadata|spec|name|port|---|\\{|\\}|\\[|\\]|:|,| |\n|-|[a-z0-9]{1,5}|\"|HTTPRoute|Gateway|gateway.networking.k8s.io/v1){0,80}") {
        let _ = parse_documents(&s);
    }

    /// Cutting or corrupting the fixture at any point gives errors or resources, never a panic,
    /// and every error names a document that exists.
    #[test]
    fn mutated_fixture_never_panics(cut in 0usize..FIXTURE.len(), junk in "[ -~\n]{0,8}") {
        let mut text = FIXTURE.as_bytes()[..cut].to_vec();
        text.extend_from_slice(junk.as_bytes());
        text.extend_from_slice(&FIXTURE.as_bytes()[cut..]);
        if let Ok(text) = String::from_utf8(text)
            && let Err(errors) = parse_documents(&text)
        {
            prop_assert!(!errors.is_empty());
            let docs = text.matches("\n---").count() + 2;
            for e in errors.errors() {
                prop_assert!(e.document < docs, "{}", e);
            }
        }
    }

    #[test]
    fn json_values_never_panic(v in arb_json()) {
        let _ = parse_documents(&v.to_string());
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "(apiVersion|kind|Gateway|HTTPRoute|v1|biplane.dev/v1alpha1|Backend|[a-z]{0,6})"
            .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                "(apiVersion|kind|metadata|spec|name|listeners|rules|port|protocol|[a-z]{1,6})",
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
