//! `images`: new names, tags and digests for container images, wherever a `containers` or
//! `initContainers` list sits in an object (as kustomize's image transformer walks them).

use regex::Regex;
use serde_json::{Map, Value};

use crate::kustomization::Image;

/// Splits an image reference into name, tag and digest (a `:` in the registry host is not a tag).
pub fn split(image: &str) -> (String, String, String) {
    let slash = image.find('/').filter(|&i| i > 0).unwrap_or(0);
    let search = &image[slash..];
    let id = search.find('@');
    let ic = search.find(':');
    match (id, ic) {
        (None, None) => (image.to_string(), String::new(), String::new()),
        (Some(d), c) if c.is_none() || d < c.unwrap_or(usize::MAX) => {
            let d = d + slash;
            (image[..d].to_string(), String::new(), image[d + 1..].to_string())
        }
        (Some(d), Some(c)) => {
            let (d, c) = (d + slash, c + slash);
            (
                image[..c].to_string(),
                image[c + 1..d].to_string(),
                image[d + 1..].to_string(),
            )
        }
        (None, Some(c)) => {
            let c = c + slash;
            (image[..c].to_string(), image[c + 1..].to_string(), String::new())
        }
        _ => unreachable!("covered above"),
    }
}

/// The pattern kustomize matches image references with: the entry's name (as a regular
/// expression), then an optional tag and digest.
fn pattern(name: &str) -> Option<Regex> {
    const REST: &str = "(@sha256)?(:[a-zA-Z0-9_.{}-]*)?(@sha256:[a-zA-Z0-9]*)?$";
    Regex::new(&format!("^{name}{REST}"))
        .or_else(|_| Regex::new(&format!("^{}{REST}", regex::escape(name))))
        .ok()
}

/// The new reference for `image`, or `None` when the entry does not apply to it.
#[cfg(test)]
fn rewrite(image: &str, im: &Image) -> Option<String> {
    rewrite_with(image, im, pattern(&im.name).as_ref()?)
}

/// [`rewrite`] with the entry's pattern compiled.
fn rewrite_with(image: &str, im: &Image, re: &Regex) -> Option<String> {
    if !re.is_match(image) {
        return None;
    }
    let (mut name, mut tag, mut digest) = split(image);
    if let Some(n) = im.new_name.as_deref().filter(|s| !s.is_empty()) {
        name = n.to_string();
    }
    let new_tag = im.new_tag.as_deref().filter(|s| !s.is_empty());
    let new_digest = im.digest.as_deref().filter(|s| !s.is_empty());
    match (new_tag, new_digest) {
        (Some(t), Some(d)) => (tag, digest) = (t.into(), d.into()),
        (Some(t), None) => (tag, digest) = (t.into(), String::new()),
        (None, Some(d)) => (tag, digest) = (String::new(), d.into()),
        (None, None) => {}
    }
    if !tag.is_empty() {
        name = format!("{name}:{tag}");
    }
    if !digest.is_empty() {
        name = format!("{name}@{digest}");
    }
    Some(name)
}

/// Applies one `images` entry to every object.
pub fn apply_all<'a>(objs: impl Iterator<Item = &'a mut Map<String, Value>>, im: &Image) {
    let Some(re) = pattern(&im.name) else { return };
    for obj in objs {
        apply(obj, im, &re);
    }
}

fn apply(obj: &mut Map<String, Value>, im: &Image, re: &Regex) {
    for (k, v) in obj.iter_mut() {
        if k == "containers" || k == "initContainers" {
            if let Value::Array(items) = v {
                for c in items.iter_mut() {
                    if let Some(Value::String(image)) = c.get_mut("image") {
                        if let Some(n) = rewrite_with(image, im, re) {
                            *image = n;
                        }
                    }
                }
            }
        }
        walk(v, im, re);
    }
}

fn walk(v: &mut Value, im: &Image, re: &Regex) {
    match v {
        Value::Object(m) => apply(m, im, re),
        Value::Array(a) => a.iter_mut().for_each(|x| walk(x, im, re)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(name: &str, new_name: Option<&str>, tag: Option<&str>, digest: Option<&str>) -> Image {
        Image {
            name: name.into(),
            new_name: new_name.map(Into::into),
            new_tag: tag.map(Into::into),
            digest: digest.map(Into::into),
        }
    }

    #[test]
    fn table() {
        for (image, entry, want) in [
            ("nginx", img("nginx", None, Some("1.2"), None), Some("nginx:1.2")),
            (
                "nginx:1.0",
                img("nginx", Some("reg/nginx"), None, None),
                Some("reg/nginx:1.0"),
            ),
            (
                "nginx:1.0",
                img("nginx", None, None, Some("sha256:abc")),
                Some("nginx@sha256:abc"),
            ),
            ("nginx@sha256:abc", img("nginx", None, Some("2"), None), Some("nginx:2")),
            (
                "localhost:5000/app:v1",
                img("localhost:5000/app", None, Some("v2"), None),
                Some("localhost:5000/app:v2"),
            ),
            ("nginxx:1.0", img("nginx", None, Some("2"), None), None),
            (
                "nginx:1.25@sha256:abc",
                img("nginx", Some("m/nginx"), None, None),
                Some("m/nginx:1.25@sha256:abc"),
            ),
        ] {
            assert_eq!(rewrite(image, &entry).as_deref(), want, "{image}");
        }
        assert_eq!(
            split("localhost:5000/app:v1"),
            ("localhost:5000/app".into(), "v1".into(), String::new())
        );
    }
}
