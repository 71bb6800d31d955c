//! The build: accumulate resources, components and generated objects of a kustomization,
//! run its transformers in kustomize's order, recurse for bases; at the top, add hash
//! suffixes, rewrite references to renamed objects and sort in kustomize's legacy order.

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::fieldspec::{self, add_pairs, FieldSpec};
use crate::fs::{is_within, join, normalize, Fs};
use crate::kustomization::{self, GenOptions, Generator, Kustomization, Patch};
use crate::resource::Res;
use crate::{hash, nameref, smp};

pub(crate) struct Builder<'a> {
    pub fs: &'a dyn Fs,
    /// Directories being built, to refuse cycles.
    stack: Vec<String>,
}

fn read_text(fs: &dyn Fs, path: &str) -> Result<String, Error> {
    let bytes = fs.read(path).map_err(|e| Error::read(path, e.to_string()))?;
    String::from_utf8(bytes).map_err(|_| Error::read(path, "not UTF-8 text"))
}

/// Parses every YAML document of a text into objects; `file` names it in errors.
pub(crate) fn parse_docs(file: &str, text: &str) -> Result<Vec<Map<String, Value>>, Error> {
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, crate::yaml_options())
        .map_err(|e| Error::invalid(file, "(file)", format!("not valid YAML: {e}")))?;
    let mut out = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        match d {
            Value::Null => {}
            Value::Object(m) => out.push(m),
            _ => {
                return Err(Error::invalid(
                    file,
                    format!("document {}", i + 1),
                    "expected a map (a Kubernetes object)",
                ))
            }
        }
    }
    Ok(out)
}

fn find_kustomization(fs: &dyn Fs, dir: &str) -> Result<Option<String>, Error> {
    let found: Vec<String> = kustomization::FILE_NAMES
        .iter()
        .map(|n| join(dir, n))
        .filter(|p| fs.is_file(p))
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        _ => Err(Error::invalid(
            dir,
            "(directory)",
            format!("holds more than one kustomization file: {}", found.join(", ")),
        )),
    }
}

fn looks_remote(s: &str) -> bool {
    s.contains("://")
        || s.starts_with("github.com/")
        || s.starts_with("git@")
        || s.contains("?ref=")
        || s.starts_with("gitlab.com/")
}

impl<'a> Builder<'a> {
    pub fn new(fs: &'a dyn Fs) -> Self {
        Builder { fs, stack: Vec::new() }
    }

    pub fn load(&self, dir: &str) -> Result<Kustomization, Error> {
        let Some(file) = find_kustomization(self.fs, dir)? else {
            return Err(Error::read(
                dir,
                "no kustomization.yaml, kustomization.yml or Kustomization in this directory",
            ));
        };
        kustomization::parse(&file, &read_text(self.fs, &file)?)
    }

    /// A whole build of `dir`: the output objects in kustomize's order.
    pub fn build_top(&mut self, dir: &str) -> Result<Vec<Map<String, Value>>, Error> {
        let dir = normalize(dir);
        let k = self.load(&dir)?;
        if k.is_component {
            return Err(Error::invalid(
                &k.file,
                "kind",
                "a Component cannot be built on its own; list it under `components` of a Kustomization",
            ));
        }
        let mut ra = Vec::new();
        self.accumulate(&dir, &k, &mut ra)?;
        // Hash suffixes, then references, as kustomize does last.
        for r in ra.iter_mut() {
            if r.gen.as_ref().is_some_and(|g| g.hash) {
                let name = format!("{}-{}", r.name(), hash::suffix(&r.obj));
                r.set_name(&name);
            }
        }
        nameref::fix(&mut ra).map_err(|reason| Error::invalid(&k.file, "(references)", reason))?;
        crate::order::legacy_sort(&mut ra);
        Ok(ra.into_iter().map(|r| r.obj).collect())
    }

    fn build_sub(&mut self, dir: &str, from: &str, field: &str) -> Result<Vec<Res>, Error> {
        if self.stack.iter().any(|d| d == dir) {
            return Err(Error::invalid(
                from,
                field,
                format!("`{dir}` is already being built: the kustomizations form a cycle"),
            ));
        }
        let k = self.load(dir)?;
        if k.is_component {
            return Err(Error::invalid(
                from,
                field,
                format!("`{dir}` is a Component; list it under `components`, not `resources`"),
            ));
        }
        let mut ra = Vec::new();
        self.accumulate(dir, &k, &mut ra)?;
        Ok(ra)
    }

    fn accumulate(&mut self, dir: &str, k: &Kustomization, ra: &mut Vec<Res>) -> Result<(), Error> {
        self.stack.push(dir.to_string());
        let file = k.file.as_str();
        for (i, entry) in k.resources.iter().enumerate() {
            let field = format!("resources[{i}]");
            if looks_remote(entry) {
                return Err(Error::Unsupported {
                    file: file.into(),
                    field: format!("{field} ({entry})"),
                    hint:
                        "remote bases are not fetched; vendor the base into the repository and point to its directory"
                            .into(),
                });
            }
            let path = join(dir, entry);
            if self.fs.is_dir(&path) {
                for r in self.build_sub(&path, file, &field)? {
                    append(ra, r, file, &field)?;
                }
            } else if self.fs.is_file(&path) {
                self.restrict(dir, &path, file, &field)?;
                let text = read_text(self.fs, &path)?;
                for (j, obj) in parse_docs(&path, &text)?.into_iter().enumerate() {
                    for obj in expand_list(obj) {
                        check_object(&path, j, &obj)?;
                        append(ra, Res::new(obj), &path, &format!("document {}", j + 1))?;
                    }
                }
            } else {
                return Err(Error::invalid(
                    file,
                    field,
                    format!("`{entry}` is neither a file nor a directory ({path})"),
                ));
            }
        }
        // kustomize's order: resources, this kustomization's generators, components (each
        // with its own resources, generators and transformers), this kustomization's
        // transformers.
        self.generate(dir, k, ra)?;
        for (i, entry) in k.components.iter().enumerate() {
            let field = format!("components[{i}]");
            if looks_remote(entry) {
                return Err(Error::Unsupported {
                    file: file.into(),
                    field: format!("{field} ({entry})"),
                    hint: "remote components are not fetched; vendor the component into the repository".into(),
                });
            }
            let cdir = join(dir, entry);
            if !self.fs.is_dir(&cdir) {
                return Err(Error::invalid(
                    file,
                    field,
                    format!("`{entry}` is not a directory ({cdir})"),
                ));
            }
            if self.stack.contains(&cdir) {
                return Err(Error::invalid(
                    file,
                    field,
                    format!("`{cdir}` is already being built: the kustomizations form a cycle"),
                ));
            }
            let ck = self.load(&cdir)?;
            if !ck.is_component {
                return Err(Error::invalid(
                    file,
                    field,
                    format!("`{cdir}` is a Kustomization; components must have `kind: Component`"),
                ));
            }
            self.accumulate(&cdir, &ck, ra)?;
        }
        self.transform(dir, k, ra)?;
        self.stack.pop();
        Ok(())
    }

    /// Files read by a kustomization must sit in its directory or below.
    fn restrict(&self, dir: &str, path: &str, file: &str, field: &str) -> Result<(), Error> {
        if is_within(dir, path) {
            Ok(())
        } else {
            Err(Error::invalid(
                file,
                field,
                format!(
                    "`{path}` is outside `{dir}`; a kustomization may only read files in or below its own directory"
                ),
            ))
        }
    }

    fn generate(&self, dir: &str, k: &Kustomization, ra: &mut Vec<Res>) -> Result<(), Error> {
        for (g, secret) in k
            .config_maps
            .iter()
            .map(|g| (g, false))
            .chain(k.secrets.iter().map(|g| (g, true)))
        {
            let opts = merge_options(&g.options, k.generator_options.as_ref());
            let res = self.generated(dir, &k.file, g, secret, &opts)?;
            let id = res.id();
            let found = ra.iter().position(|r| r.any_id(|x| x.same(&id)));
            match (g.behavior.as_str(), found) {
                ("create", None) => ra.push(res),
                ("create", Some(_)) => {
                    return Err(Error::invalid(
                        &k.file,
                        format!("{}.name", g.field),
                        format!("{id} already exists; use `behavior: merge` or `behavior: replace` to change it"),
                    ))
                }
                (_, None) => {
                    return Err(Error::invalid(
                        &k.file,
                        format!("{}.behavior", g.field),
                        format!("{id} does not exist in the resources, so it cannot be {}d", g.behavior),
                    ))
                }
                (behavior, Some(i)) => {
                    let old = ra[i].clone();
                    let mut new = res;
                    let mut labels = old.string_map("labels");
                    labels.extend(new.string_map("labels"));
                    let mut ann = old.string_map("annotations");
                    ann.extend(new.string_map("annotations"));
                    let md = new.metadata_mut();
                    md.insert("name".into(), Value::String(old.name().into()));
                    if old.namespace().is_empty() {
                        md.remove("namespace");
                    } else {
                        md.insert("namespace".into(), Value::String(old.namespace().into()));
                    }
                    set_or_remove(md, "labels", labels);
                    set_or_remove(md, "annotations", ann);
                    if behavior == "merge" {
                        for key in ["data", "binaryData"] {
                            let mut m = old
                                .obj
                                .get(key)
                                .and_then(|v| v.as_object())
                                .cloned()
                                .unwrap_or_default();
                            if let Some(Value::Object(nm)) = new.obj.get(key) {
                                m.extend(nm.clone());
                            }
                            if !m.is_empty() {
                                new.obj.insert(key.into(), Value::Object(m));
                            }
                        }
                    }
                    new.prev = old.prev.clone();
                    new.gen = old.gen.clone();
                    ra[i] = new;
                }
            }
        }
        Ok(())
    }

    fn generated(&self, dir: &str, file: &str, g: &Generator, secret: bool, opts: &GenOptions) -> Result<Res, Error> {
        let mut data: Vec<(String, Vec<u8>)> = Vec::new();
        let add = |field: String, key: String, val: Vec<u8>, data: &mut Vec<(String, Vec<u8>)>| -> Result<(), Error> {
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
                return Err(Error::invalid(
                    file,
                    field,
                    format!("`{key}` is not a valid key (letters, digits, `-`, `_`, `.`)"),
                ));
            }
            if data.iter().any(|(k, _)| *k == key) {
                return Err(Error::invalid(file, field, format!("key `{key}` is given twice")));
            }
            data.push((key, val));
            Ok(())
        };
        for (i, path) in g.envs.iter().enumerate() {
            let field = format!("{}.envs[{i}]", g.field);
            let p = join(dir, path);
            self.restrict(dir, &p, file, &field)?;
            let text = read_text(self.fs, &p)?;
            for (n, line) in text.lines().enumerate() {
                let line = if n == 0 {
                    line.trim_start_matches('\u{feff}')
                } else {
                    line
                };
                let line = line.trim_start();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((k, v)) = line.split_once('=') else {
                    return Err(Error::invalid(
                        file,
                        &field,
                        format!("{p} line {}: `{line}` has no `=`; write KEY=VALUE", n + 1),
                    ));
                };
                add(field.clone(), k.to_string(), v.as_bytes().to_vec(), &mut data)?;
            }
        }
        for (i, lit) in g.literals.iter().enumerate() {
            let field = format!("{}.literals[{i}]", g.field);
            let Some((k, v)) = lit.split_once('=') else {
                return Err(Error::invalid(
                    file,
                    field,
                    format!("`{lit}` has no `=`; write KEY=VALUE"),
                ));
            };
            let v = unquote(v);
            add(field, k.to_string(), v.as_bytes().to_vec(), &mut data)?;
        }
        for (i, f) in g.files.iter().enumerate() {
            let field = format!("{}.files[{i}]", g.field);
            let (key, path) = match f.split_once('=') {
                Some((k, p)) => (k.to_string(), p.to_string()),
                None => (f.rsplit('/').next().unwrap_or(f).to_string(), f.clone()),
            };
            let p = join(dir, &path);
            self.restrict(dir, &p, file, &field)?;
            if self.fs.is_dir(&p) {
                return Err(Error::invalid(
                    file,
                    field,
                    format!("`{path}` is a directory; list its files"),
                ));
            }
            let bytes = self.fs.read(&p).map_err(|e| Error::read(&p, e.to_string()))?;
            add(field, key, bytes, &mut data)?;
        }
        let mut obj = Map::new();
        obj.insert("apiVersion".into(), Value::String("v1".into()));
        obj.insert(
            "kind".into(),
            Value::String(if secret { "Secret" } else { "ConfigMap" }.into()),
        );
        let mut md = Map::new();
        md.insert("name".into(), Value::String(g.name.clone()));
        if !g.namespace.is_empty() {
            md.insert("namespace".into(), Value::String(g.namespace.clone()));
        }
        let to_map = |pairs: &[(String, String)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<Map<_, _>>()
        };
        if !opts.labels.is_empty() {
            md.insert("labels".into(), Value::Object(to_map(&opts.labels)));
        }
        if !opts.annotations.is_empty() {
            md.insert("annotations".into(), Value::Object(to_map(&opts.annotations)));
        }
        obj.insert("metadata".into(), Value::Object(md));
        let b64 = |b: &[u8]| Value::String(wrapped_base64(b));
        if secret {
            obj.insert(
                "type".into(),
                Value::String(g.secret_type.clone().unwrap_or_else(|| "Opaque".into())),
            );
            if !data.is_empty() {
                obj.insert(
                    "data".into(),
                    Value::Object(data.iter().map(|(k, v)| (k.clone(), b64(v))).collect()),
                );
            }
        } else {
            let mut text = Map::new();
            let mut binary = Map::new();
            for (k, v) in &data {
                match std::str::from_utf8(v) {
                    Ok(s) => text.insert(k.clone(), Value::String(s.to_string())),
                    Err(_) => binary.insert(k.clone(), b64(v)),
                };
            }
            if !text.is_empty() {
                obj.insert("data".into(), Value::Object(text));
            }
            if !binary.is_empty() {
                obj.insert("binaryData".into(), Value::Object(binary));
            }
        }
        if opts.immutable {
            obj.insert("immutable".into(), Value::Bool(true));
        }
        let mut r = Res::new(obj);
        r.gen = Some(crate::resource::GenInfo {
            hash: !opts.disable_hash,
        });
        Ok(r)
    }

    fn transform(&self, dir: &str, k: &Kustomization, ra: &mut Vec<Res>) -> Result<(), Error> {
        let file = k.file.as_str();
        // patchesStrategicMerge: each entry a file (when one exists) or an inline patch.
        for p in &k.patches_strategic_merge {
            let entry = p.path.clone().unwrap_or_default();
            let path = join(dir, &entry);
            let (src, text) = if !entry.contains('\n') && self.fs.is_file(&path) {
                self.restrict(dir, &path, file, &p.field)?;
                (path.clone(), read_text(self.fs, &path)?)
            } else {
                (format!("{file} {}", p.field), entry)
            };
            self.apply_patch_text(file, &p.field, &src, &text, None, ra, false)?;
        }
        for p in &k.patches {
            let (src, text) = self.patch_text(dir, file, p)?;
            self.apply_patch_text(file, &p.field, &src, &text, p.target.as_ref(), ra, false)?;
        }
        if let Some(ns) = &k.namespace {
            for r in ra.iter_mut() {
                if matches!(r.kind(), "RoleBinding" | "ClusterRoleBinding") {
                    namespace_subjects(r, ns);
                }
                if !r.cluster_scoped() {
                    r.set_namespace(ns);
                } else if r.kind() == "Namespace" && r.group_version() == (String::new(), "v1".into()) {
                    // kustomize renames the Namespace objects of a tree to the namespace.
                    r.set_name(ns);
                }
            }
        }
        if !k.name_prefix.is_empty() || !k.name_suffix.is_empty() {
            for r in ra.iter_mut() {
                if matches!(r.kind(), "CustomResourceDefinition" | "Namespace")
                    || (r.kind() == "APIService" && r.group_version().0 == "apiregistration.k8s.io")
                {
                    continue;
                }
                let name = format!("{}{}{}", k.name_prefix, r.name(), k.name_suffix);
                r.set_name(&name);
            }
        }
        // Labels: each `labels` entry, then commonLabels.
        for l in &k.labels {
            let mut specs: Vec<FieldSpec> = vec![fieldspec::METADATA_LABELS];
            if l.include_selectors {
                specs.extend_from_slice(fieldspec::TEMPLATE_LABELS);
                specs.extend_from_slice(fieldspec::SELECTOR_LABELS);
            } else if l.include_templates {
                specs.extend_from_slice(fieldspec::TEMPLATE_LABELS);
            }
            for r in ra.iter_mut() {
                add_pairs(r, &specs, &l.pairs);
            }
        }
        if !k.common_labels.is_empty() {
            let mut specs: Vec<FieldSpec> = vec![fieldspec::METADATA_LABELS];
            specs.extend_from_slice(fieldspec::TEMPLATE_LABELS);
            specs.extend_from_slice(fieldspec::SELECTOR_LABELS);
            for r in ra.iter_mut() {
                add_pairs(r, &specs, &k.common_labels);
            }
        }
        if !k.common_annotations.is_empty() {
            for r in ra.iter_mut() {
                add_pairs(r, fieldspec::ANNOTATIONS, &k.common_annotations);
            }
        }
        for p in &k.patches_json6902 {
            let (src, text) = self.patch_text(dir, file, p)?;
            self.apply_patch_text(file, &p.field, &src, &text, p.target.as_ref(), ra, true)?;
        }
        for (name, count, field) in &k.replicas {
            let mut found = false;
            for r in ra.iter_mut() {
                for spec in fieldspec::REPLICAS {
                    if spec.selects_res(r) && r.any_id(|id| id.name == *name) {
                        found = true;
                        fieldspec::visit(&mut r.obj, spec.path, true, &mut |v| *v = count.clone());
                    }
                }
            }
            if !found {
                return Err(Error::invalid(
                    file,
                    format!("{field}.name"),
                    format!("no Deployment, ReplicationController, ReplicaSet or StatefulSet is named `{name}`"),
                ));
            }
        }
        for im in &k.images {
            crate::images::apply_all(ra.iter_mut().map(|r| &mut r.obj), im);
        }
        Ok(())
    }

    fn patch_text(&self, dir: &str, file: &str, p: &Patch) -> Result<(String, String), Error> {
        match (&p.path, &p.patch) {
            (Some(path), _) => {
                let full = join(dir, path);
                self.restrict(dir, &full, file, &format!("{}.path", p.field))?;
                if !self.fs.is_file(&full) {
                    return Err(Error::invalid(
                        file,
                        format!("{}.path", p.field),
                        format!("`{path}` does not exist ({full})"),
                    ));
                }
                Ok((full.clone(), read_text(self.fs, &full)?))
            }
            (None, Some(text)) => Ok((format!("{file} {}.patch", p.field), text.clone())),
            (None, None) => Err(Error::invalid(file, &p.field, "give `path` or `patch`")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_patch_text(
        &self,
        file: &str,
        field: &str,
        src: &str,
        text: &str,
        target: Option<&crate::select::Selector>,
        ra: &mut Vec<Res>,
        json_only: bool,
    ) -> Result<(), Error> {
        let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, crate::yaml_options())
            .map_err(|e| Error::invalid(src, "(patch)", format!("not valid YAML: {e}")))?;
        let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
        let is_json = docs.len() == 1 && docs[0].is_array();
        if json_only && !is_json {
            return Err(Error::invalid(
                src,
                "(patch)",
                "a JSON 6902 patch is a list of operations (`- op: replace ...`)",
            ));
        }
        let selected: Option<Vec<usize>> = match target {
            Some(sel) => {
                let c = sel
                    .compile()
                    .map_err(|(f, e)| Error::invalid(file, format!("{field}.target.{f}"), e))?;
                Some(
                    ra.iter()
                        .enumerate()
                        .filter(|(_, r)| c.matches(r))
                        .map(|(i, _)| i)
                        .collect(),
                )
            }
            None => None,
        };
        if is_json {
            let Some(sel) = selected else {
                return Err(Error::invalid(
                    file,
                    format!("{field}.target"),
                    "a JSON 6902 patch needs a target",
                ));
            };
            let ops: json_patch::Patch = serde_json::from_value(docs[0].clone())
                .map_err(|e| Error::invalid(src, "(patch)", format!("not a JSON 6902 patch: {e}")))?;
            for i in sel {
                let mut v = Value::Object(std::mem::take(&mut ra[i].obj));
                let res = json_patch::patch(&mut v, &ops);
                let id = {
                    ra[i].obj = v.as_object().cloned().unwrap_or_default();
                    ra[i].id()
                };
                res.map_err(|e| Error::invalid(src, "(patch)", format!("cannot apply to {id}: {e}")))?;
            }
            return Ok(());
        }
        for (j, d) in docs.iter().enumerate() {
            let Some(pm) = d.as_object() else {
                return Err(Error::invalid(
                    src,
                    format!("document {}", j + 1),
                    "a strategic merge patch is a map",
                ));
            };
            let targets: Vec<usize> = match &selected {
                Some(s) => s.clone(),
                None => {
                    let pr = Res::new(pm.clone());
                    let pid = pr.id();
                    if pid.kind.is_empty() || pid.name.is_empty() {
                        return Err(Error::invalid(
                            src,
                            format!("document {}", j + 1),
                            "a patch without a target needs apiVersion, kind and metadata.name to find the object it patches",
                        ));
                    }
                    let found: Vec<usize> = ra
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.any_id(|x| x.same(&pid)))
                        .map(|(i, _)| i)
                        .collect();
                    if found.len() != 1 {
                        return Err(Error::invalid(
                            file,
                            field,
                            format!(
                                "the patch in {src} is for {pid}, which {}",
                                if found.is_empty() {
                                    "is not among the resources"
                                } else {
                                    "matches several resources"
                                }
                            ),
                        ));
                    }
                    found
                }
            };
            let mut deleted = Vec::new();
            for i in targets {
                let r = &mut ra[i];
                let (name, ns, kind) = (r.name().to_string(), r.namespace().to_string(), r.kind().to_string());
                if !smp::merge_object(&mut r.obj, pm) {
                    deleted.push(i);
                    continue;
                }
                smp::normalize(&mut r.obj);
                r.obj.insert("kind".into(), Value::String(kind));
                let md = r.metadata_mut();
                md.insert("name".into(), Value::String(name));
                if ns.is_empty() {
                    md.remove("namespace");
                } else {
                    md.insert("namespace".into(), Value::String(ns));
                }
            }
            for i in deleted.into_iter().rev() {
                ra.remove(i);
            }
        }
        Ok(())
    }
}

/// Base64 as kustomize writes generated data: longer than 70 characters, it is cut into
/// lines of 70, each ending with a newline.
fn wrapped_base64(b: &[u8]) -> String {
    const LINE: usize = 70;
    let enc = base64::engine::general_purpose::STANDARD.encode(b);
    if enc.len() <= LINE {
        return enc;
    }
    let mut out = String::with_capacity(enc.len() + enc.len() / LINE + 1);
    for chunk in enc.as_bytes().chunks(LINE) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out
}

fn set_or_remove(md: &mut Map<String, Value>, key: &str, m: Map<String, Value>) {
    if m.is_empty() {
        md.remove(key);
    } else {
        md.insert(key.into(), Value::Object(m));
    }
}

fn unquote(v: &str) -> &str {
    let b = v.as_bytes();
    if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[0] == b[b.len() - 1] {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// Global generator options under a generator's own (a generator's labels and annotations
/// win over `generatorOptions`, as `kubectl kustomize` does).
fn merge_options(local: &GenOptions, global: Option<&GenOptions>) -> GenOptions {
    let mut o = local.clone();
    if let Some(g) = global {
        for (k, v) in &g.labels {
            if !o.labels.iter().any(|(x, _)| x == k) {
                o.labels.push((k.clone(), v.clone()));
            }
        }
        for (k, v) in &g.annotations {
            if !o.annotations.iter().any(|(x, _)| x == k) {
                o.annotations.push((k.clone(), v.clone()));
            }
        }
        o.disable_hash |= g.disable_hash;
        o.immutable |= g.immutable;
    }
    o
}

fn expand_list(obj: Map<String, Value>) -> Vec<Map<String, Value>> {
    let is_list = obj
        .get("kind")
        .and_then(|k| k.as_str())
        .is_some_and(|k| k == "List" || k.ends_with("List"))
        && obj.get("items").is_some_and(|i| i.is_array());
    if !is_list {
        return vec![obj];
    }
    match obj.get("items") {
        Some(Value::Array(items)) => items.iter().filter_map(|i| i.as_object().cloned()).collect(),
        _ => vec![obj],
    }
}

fn non_empty(v: Option<&Value>) -> bool {
    v.and_then(|v| v.as_str()).is_some_and(|s| !s.is_empty())
}

fn check_object(file: &str, doc: usize, obj: &Map<String, Value>) -> Result<(), Error> {
    let field = format!("document {}", doc + 1);
    for key in ["apiVersion", "kind"] {
        if !non_empty(obj.get(key)) {
            return Err(Error::invalid(
                file,
                format!("{field} {key}"),
                "missing; every object needs apiVersion and kind",
            ));
        }
    }
    if !non_empty(obj.get("metadata").and_then(|m| m.get("name"))) {
        return Err(Error::invalid(
            file,
            format!("{field} metadata.name"),
            "missing; every object needs a name",
        ));
    }
    Ok(())
}

fn append(ra: &mut Vec<Res>, r: Res, file: &str, field: &str) -> Result<(), Error> {
    let id = r.id();
    if ra.iter().any(|x| x.id().same(&id)) {
        return Err(Error::invalid(
            file,
            field,
            format!("{id} is already among the resources (listed twice?)"),
        ));
    }
    ra.push(r);
    Ok(())
}

/// The namespace transformer's treatment of RoleBinding subjects (kustomize's `defaultOnly`):
/// the ServiceAccount named `default` follows the objects into the new namespace.
fn namespace_subjects(r: &mut Res, ns: &str) {
    if let Some(Value::Array(subjects)) = r.obj.get_mut("subjects") {
        for s in subjects.iter_mut() {
            if let Value::Object(m) = s {
                let is_sa = m.get("kind").and_then(|k| k.as_str()) == Some("ServiceAccount");
                let is_default = m.get("name").and_then(|n| n.as_str()) == Some("default");
                if is_sa && is_default {
                    m.insert("namespace".into(), Value::String(ns.into()));
                }
            }
        }
    }
}
