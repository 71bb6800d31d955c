//! Properties of the engine over generated input: the YAML printer round-trips every value,
//! strategic merge is idempotent, and no kustomization text makes the engine panic.

use outpost_kustomize::{build, parse_stream, to_yaml, MemFs};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Strings that trip YAML printers: keywords, numbers, indicators, whitespace, newlines.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("yes".to_string()),
        Just("null".to_string()),
        Just("~".to_string()),
        Just("1.0".to_string()),
        Just("0x1f".to_string()),
        Just("- item".to_string()),
        Just("a: b".to_string()),
        Just(" leading".to_string()),
        Just("trailing ".to_string()),
        Just("multi\nline\n".to_string()),
        Just("#comment".to_string()),
        Just("".to_string()),
        "[a-zA-Z0-9 :#'\"\\-\\n\\t{}\\[\\],&*!|>%@`]{0,12}",
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        tricky_string().prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z][a-z0-9./-]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn containers() -> impl Strategy<Value = Value> {
    prop::collection::vec(("[a-d]", "[a-z]{1,3}", prop::option::of("[a-z]{1,3}")), 0..5).prop_map(|cs| {
        let mut seen = std::collections::BTreeSet::new();
        let list: Vec<Value> = cs
            .into_iter()
            .filter(|(n, _, _)| seen.insert(n.clone()))
            .map(|(n, image, env)| {
                let mut c = json!({"name": n, "image": image});
                if let Some(e) = env {
                    c["env"] = json!([{"name": e, "value": "v"}]);
                }
                c
            })
            .collect();
        json!({"spec": {"template": {"spec": {"containers": list}}}})
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn printed_yaml_parses_back_to_the_same_objects(objs in prop::collection::vec(
        prop::collection::btree_map("[a-z]{1,6}", value(), 1..5).prop_map(|m| Value::Object(m.into_iter().collect())), 1..4)
    ) {
        let text = to_yaml(&objs);
        let back = parse_stream(&text).unwrap();
        prop_assert_eq!(back, objs, "printed:\n{}", text);
    }

    #[test]
    fn strategic_merge_is_idempotent(target in containers(), patch in containers()) {
        let dep = |spec: &Value| {
            let mut d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"}});
            d["spec"] = spec["spec"].clone();
            serde_saphyr::to_string(&d).unwrap()
        };
        let render = |patches: usize| {
            let mut fs = MemFs::new();
            let list: String = (0..patches).map(|_| "- path: p.yaml\n").collect();
            fs.insert("r/kustomization.yaml", format!("resources:\n- d.yaml\npatches:\n{list}"));
            fs.insert("r/d.yaml", dep(&target));
            fs.insert("r/p.yaml", dep(&patch));
            build(&fs, "r").unwrap()
        };
        prop_assert_eq!(render(1), render(2));
    }

    #[test]
    fn no_kustomization_text_panics(text in "[a-zA-Z: \\-\\n\\[\\]{}./$'\"=]{0,200}") {
        let mut fs = MemFs::new();
        fs.insert("r/kustomization.yaml", text.as_bytes());
        fs.insert("r/d.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n");
        let _ = build(&fs, "r");
    }
}
