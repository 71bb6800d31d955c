//! The kustomization file: the fields outpost implements, read into typed values; every
//! other field refused with the file and the field named.

use serde_json::{Map, Value};

use crate::error::Error;
use crate::select::Selector;

pub const FILE_NAMES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Fields kustomize has and outpost refuses, with what to do instead.
const REFUSED: &[(&str, &str)] = &[
    ("helmCharts", "render the chart into plain manifests and commit them"),
    ("helmGlobals", "render the chart into plain manifests and commit them"),
    (
        "helmChartInflationGenerator",
        "render the chart into plain manifests and commit them",
    ),
    (
        "replacements",
        "use patches, or a generator whose references are rewritten",
    ),
    ("vars", "use patches, or a generator whose references are rewritten"),
    ("configurations", "custom transformer configurations are not read"),
    ("crds", "custom resource definitions for transformers are not read"),
    ("generators", "generator plugins do not run on the hub"),
    ("transformers", "transformer plugins do not run on the hub"),
    ("validators", "validator plugins do not run on the hub"),
    ("inventory", "outpost keeps its own inventory of what a GitRepo applied"),
    ("openapi", "outpost uses Kubernetes' built-in merge keys"),
    ("sortOptions", "the output is always in kustomize's legacy order"),
    ("buildMetadata", "origin annotations are not added"),
    ("imageTags", "use `images`"),
    ("nameSuffixHash", "use `generatorOptions.disableNameSuffixHash`"),
];

#[derive(Debug, Clone)]
pub struct Patch {
    pub path: Option<String>,
    pub patch: Option<String>,
    pub target: Option<Selector>,
    /// Where it was declared (`patches[0]`), for messages.
    pub field: String,
}

#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    pub disable_hash: bool,
    pub immutable: bool,
}

#[derive(Debug, Clone)]
pub struct Generator {
    pub field: String,
    pub name: String,
    pub namespace: String,
    pub behavior: String,
    pub literals: Vec<String>,
    pub files: Vec<String>,
    pub envs: Vec<String>,
    pub secret_type: Option<String>,
    pub options: GenOptions,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub new_name: Option<String>,
    pub new_tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Labels {
    pub pairs: Vec<(String, String)>,
    pub include_selectors: bool,
    pub include_templates: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Kustomization {
    pub file: String,
    pub is_component: bool,
    pub resources: Vec<String>,
    pub components: Vec<String>,
    pub patches_strategic_merge: Vec<Patch>,
    pub patches: Vec<Patch>,
    pub patches_json6902: Vec<Patch>,
    pub images: Vec<Image>,
    pub namespace: Option<String>,
    pub name_prefix: String,
    pub name_suffix: String,
    pub common_labels: Vec<(String, String)>,
    pub labels: Vec<Labels>,
    pub common_annotations: Vec<(String, String)>,
    pub config_maps: Vec<Generator>,
    pub secrets: Vec<Generator>,
    pub generator_options: Option<GenOptions>,
    pub replicas: Vec<(String, Value, String)>,
}

struct Reader<'a> {
    file: &'a str,
}

impl Reader<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::invalid(self.file, field, reason)
    }
    fn scalar(&self, field: &str, v: &Value) -> Result<String, Error> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(self.err(field, "expected a string")),
        }
    }
    fn string(&self, field: &str, v: &Value) -> Result<String, Error> {
        match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(self.err(field, "expected a string")),
        }
    }
    fn bool(&self, field: &str, v: &Value) -> Result<bool, Error> {
        v.as_bool().ok_or_else(|| self.err(field, "expected true or false"))
    }
    fn list<'v>(&self, field: &str, v: &'v Value) -> Result<&'v [Value], Error> {
        match v {
            Value::Array(a) => Ok(a),
            Value::Null => Ok(&[]),
            _ => Err(self.err(field, "expected a list")),
        }
    }
    fn strings(&self, field: &str, v: &Value) -> Result<Vec<String>, Error> {
        self.list(field, v)?
            .iter()
            .enumerate()
            .map(|(i, x)| self.string(&format!("{field}[{i}]"), x))
            .collect()
    }
    fn map<'v>(&self, field: &str, v: &'v Value) -> Result<&'v Map<String, Value>, Error> {
        v.as_object().ok_or_else(|| self.err(field, "expected a map"))
    }
    fn pairs(&self, field: &str, v: &Value) -> Result<Vec<(String, String)>, Error> {
        if v.is_null() {
            return Ok(Vec::new());
        }
        self.map(field, v)?
            .iter()
            .map(|(k, x)| Ok((k.clone(), self.scalar(&format!("{field}.{k}"), x)?)))
            .collect()
    }
    fn known(&self, field: &str, m: &Map<String, Value>, allowed: &[&str]) -> Result<(), Error> {
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(self.err(
                    &format!("{field}.{k}"),
                    format!("unknown field; expected one of {}", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }
    fn selector(&self, field: &str, v: &Value) -> Result<Selector, Error> {
        let m = self.map(field, v)?;
        self.known(
            field,
            m,
            &[
                "group",
                "version",
                "kind",
                "name",
                "namespace",
                "labelSelector",
                "annotationSelector",
            ],
        )?;
        let get = |k: &str| m.get(k).map(|x| self.string(&format!("{field}.{k}"), x)).transpose();
        Ok(Selector {
            group: get("group")?,
            version: get("version")?,
            kind: get("kind")?,
            name: get("name")?,
            namespace: get("namespace")?,
            label_selector: get("labelSelector")?,
            annotation_selector: get("annotationSelector")?,
        })
    }
    fn patch(&self, field: &str, v: &Value) -> Result<Patch, Error> {
        let m = self.map(field, v)?;
        if m.contains_key("options") {
            return Err(Error::Unsupported {
                file: self.file.into(),
                field: format!("{field}.options"),
                hint: "patches may not rename objects or change their kind".into(),
            });
        }
        self.known(field, m, &["path", "patch", "target"])?;
        let path = m
            .get("path")
            .map(|x| self.string(&format!("{field}.path"), x))
            .transpose()?;
        let patch = m
            .get("patch")
            .map(|x| self.string(&format!("{field}.patch"), x))
            .transpose()?;
        if path.is_some() == patch.is_some() {
            return Err(self.err(field, "give exactly one of `path` and `patch`"));
        }
        let target = m
            .get("target")
            .map(|t| self.selector(&format!("{field}.target"), t))
            .transpose()?;
        Ok(Patch {
            path,
            patch,
            target,
            field: field.into(),
        })
    }
    fn gen_options(&self, field: &str, v: &Value) -> Result<GenOptions, Error> {
        let m = self.map(field, v)?;
        self.known(
            field,
            m,
            &["labels", "annotations", "disableNameSuffixHash", "immutable"],
        )?;
        Ok(GenOptions {
            labels: m
                .get("labels")
                .map(|x| self.pairs(&format!("{field}.labels"), x))
                .transpose()?
                .unwrap_or_default(),
            annotations: m
                .get("annotations")
                .map(|x| self.pairs(&format!("{field}.annotations"), x))
                .transpose()?
                .unwrap_or_default(),
            disable_hash: m
                .get("disableNameSuffixHash")
                .map(|x| self.bool(&format!("{field}.disableNameSuffixHash"), x))
                .transpose()?
                .unwrap_or(false),
            immutable: m
                .get("immutable")
                .map(|x| self.bool(&format!("{field}.immutable"), x))
                .transpose()?
                .unwrap_or(false),
        })
    }
    fn generator(&self, field: &str, v: &Value, secret: bool) -> Result<Generator, Error> {
        let m = self.map(field, v)?;
        let mut allowed = vec![
            "name",
            "namespace",
            "behavior",
            "literals",
            "files",
            "envs",
            "env",
            "options",
        ];
        if secret {
            allowed.push("type");
        }
        self.known(field, m, &allowed)?;
        let s = |k: &str| m.get(k).map(|x| self.string(&format!("{field}.{k}"), x)).transpose();
        let name = s("name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| self.err(&format!("{field}.name"), "a generator needs a name"))?;
        let behavior = s("behavior")?.unwrap_or_else(|| "create".into());
        if !["create", "merge", "replace"].contains(&behavior.as_str()) {
            return Err(self.err(
                &format!("{field}.behavior"),
                format!("`{behavior}` is not one of create, merge, replace"),
            ));
        }
        let l = |k: &str| {
            m.get(k)
                .map(|x| self.strings(&format!("{field}.{k}"), x))
                .transpose()
                .map(|o| o.unwrap_or_default())
        };
        let mut envs = l("envs")?;
        if let Some(e) = s("env")? {
            envs.push(e);
        }
        Ok(Generator {
            field: field.into(),
            name,
            namespace: s("namespace")?.unwrap_or_default(),
            behavior,
            literals: l("literals")?,
            files: l("files")?,
            envs,
            secret_type: if secret { s("type")? } else { None },
            options: m
                .get("options")
                .map(|o| self.gen_options(&format!("{field}.options"), o))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// Reads a kustomization (or component) file's text. `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Kustomization, Error> {
    let r = Reader { file };
    let doc: Value = serde_saphyr::from_str_with_options(text, crate::yaml_options())
        .map_err(|e| Error::invalid(file, "(file)", format!("not valid YAML: {e}")))?;
    let doc = if doc.is_null() { Value::Object(Map::new()) } else { doc };
    let m = r.map("(file)", &doc)?;
    let mut k = Kustomization {
        file: file.into(),
        ..Default::default()
    };
    let kind = m
        .get("kind")
        .map(|v| r.string("kind", v))
        .transpose()?
        .unwrap_or_else(|| "Kustomization".into());
    match kind.as_str() {
        "Kustomization" => {}
        "Component" => k.is_component = true,
        other => return Err(r.err("kind", format!("`{other}` is neither Kustomization nor Component"))),
    }
    for (key, v) in m {
        let f = key.as_str();
        if let Some((_, hint)) = REFUSED.iter().find(|(n, _)| *n == f) {
            return Err(Error::Unsupported {
                file: file.into(),
                field: f.into(),
                hint: (*hint).into(),
            });
        }
        match f {
            "apiVersion" | "kind" | "metadata" => {}
            "resources" | "bases" => k.resources.extend(r.strings(f, v)?),
            "components" => k.components = r.strings(f, v)?,
            "namespace" => k.namespace = Some(r.string(f, v)?).filter(|s| !s.is_empty()),
            "namePrefix" => k.name_prefix = r.string(f, v)?,
            "nameSuffix" => k.name_suffix = r.string(f, v)?,
            "commonLabels" => k.common_labels = r.pairs(f, v)?,
            "commonAnnotations" => k.common_annotations = r.pairs(f, v)?,
            "patches" => {
                for (i, p) in r.list(f, v)?.iter().enumerate() {
                    k.patches.push(r.patch(&format!("patches[{i}]"), p)?);
                }
            }
            "patchesStrategicMerge" => {
                for (i, p) in r.list(f, v)?.iter().enumerate() {
                    let field = format!("patchesStrategicMerge[{i}]");
                    let s = r.string(&field, p)?;
                    // A path or an inline patch; which one is decided when the tree is read.
                    k.patches_strategic_merge.push(Patch {
                        path: Some(s),
                        patch: None,
                        target: None,
                        field,
                    });
                }
            }
            "patchesJson6902" => {
                for (i, p) in r.list(f, v)?.iter().enumerate() {
                    let field = format!("patchesJson6902[{i}]");
                    let p = r.patch(&field, p)?;
                    if p.target.is_none() {
                        return Err(r.err(&format!("{field}.target"), "a JSON 6902 patch needs a target"));
                    }
                    k.patches_json6902.push(p);
                }
            }
            "images" => {
                for (i, im) in r.list(f, v)?.iter().enumerate() {
                    let field = format!("images[{i}]");
                    let m = r.map(&field, im)?;
                    r.known(&field, m, &["name", "newName", "newTag", "digest"])?;
                    let g = |k: &str| m.get(k).map(|x| r.scalar(&format!("{field}.{k}"), x)).transpose();
                    k.images.push(Image {
                        name: g("name")?.ok_or_else(|| {
                            r.err(&format!("{field}.name"), "an image entry needs the name it replaces")
                        })?,
                        new_name: g("newName")?,
                        new_tag: g("newTag")?,
                        digest: g("digest")?,
                    });
                }
            }
            "labels" => {
                for (i, l) in r.list(f, v)?.iter().enumerate() {
                    let field = format!("labels[{i}]");
                    let m = r.map(&field, l)?;
                    if m.contains_key("fields") {
                        return Err(Error::Unsupported {
                            file: file.into(),
                            field: format!("{field}.fields"),
                            hint: "labels go to metadata, and with includeSelectors/includeTemplates to selectors and templates".into(),
                        });
                    }
                    r.known(&field, m, &["pairs", "includeSelectors", "includeTemplates"])?;
                    let b = |k: &str| {
                        m.get(k)
                            .map(|x| r.bool(&format!("{field}.{k}"), x))
                            .transpose()
                            .map(|o| o.unwrap_or(false))
                    };
                    k.labels.push(Labels {
                        pairs: m
                            .get("pairs")
                            .map(|x| r.pairs(&format!("{field}.pairs"), x))
                            .transpose()?
                            .unwrap_or_default(),
                        include_selectors: b("includeSelectors")?,
                        include_templates: b("includeTemplates")?,
                    });
                }
            }
            "configMapGenerator" | "secretGenerator" => {
                let secret = f == "secretGenerator";
                for (i, g) in r.list(f, v)?.iter().enumerate() {
                    let gen = r.generator(&format!("{f}[{i}]"), g, secret)?;
                    if secret {
                        k.secrets.push(gen)
                    } else {
                        k.config_maps.push(gen)
                    }
                }
            }
            "generatorOptions" => k.generator_options = Some(r.gen_options(f, v)?),
            "replicas" => {
                for (i, rep) in r.list(f, v)?.iter().enumerate() {
                    let field = format!("replicas[{i}]");
                    let m = r.map(&field, rep)?;
                    r.known(&field, m, &["name", "count"])?;
                    let name = m
                        .get("name")
                        .map(|x| r.string(&format!("{field}.name"), x))
                        .transpose()?;
                    let count = m.get("count").filter(|c| c.is_i64() || c.is_u64()).cloned();
                    match (name, count) {
                        (Some(n), Some(c)) => k.replicas.push((n, c, field)),
                        (None, _) => return Err(r.err(&format!("{field}.name"), "a replicas entry needs a name")),
                        (_, None) => {
                            return Err(r.err(&format!("{field}.count"), "a replicas entry needs an integer count"))
                        }
                    }
                }
            }
            other => return Err(r.err(other, "unknown kustomization field")),
        }
    }
    if let Some((l, _)) = k
        .labels
        .iter()
        .flat_map(|l| l.pairs.iter())
        .find(|(l, _)| k.common_labels.iter().any(|(c, _)| c == l))
    {
        return Err(r.err("labels", format!("label `{l}` is in both commonLabels and labels")));
    }
    Ok(k)
}
