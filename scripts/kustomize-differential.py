#!/usr/bin/env python3
"""Differential test of outpost's Kustomize engine against `kubectl kustomize`: generates random
trees (a base of workloads, Services, generators; up to three overlay levels with prefixes,
suffixes, namespaces, labels, annotations, images, generator merges and replaces, patches,
replicas), renders each with both, and compares the parsed YAML. Prints the trees that differ.

    python3 scripts/kustomize-differential.py [SEED] [COUNT]

Needs PyYAML, kubectl (OUTPOST_KUBECTL, default .venv/bin/kubectl) and a built outpost
(OUTPOST_BIN, default target/debug/outpost). A difference found here belongs in
crates/outpost-kustomize/tests/fixtures/ as a fixture once fixed.
"""
import os, random, subprocess, shutil, yaml, json, sys
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 30
import tempfile
WORK = tempfile.mkdtemp(prefix="kustomize-diff-")
KUBECTL = os.environ.get("OUTPOST_KUBECTL", ".venv/bin/kubectl")
OURS = os.environ.get("OUTPOST_BIN", "target/debug/outpost")
def dep(name, cm, sec, img):
    return {"apiVersion": "apps/v1", "kind": random.choice(["Deployment", "StatefulSet", "DaemonSet"]), "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}}, "spec": {
                "serviceAccountName": "sa",
                "containers": [{"name": "main", "image": img, "envFrom": [{"configMapRef": {"name": cm}}],
                                "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": sec, "key": "k"}}}],
                                "ports": [{"containerPort": 8080}]}],
                "volumes": [{"name": "v", "configMap": {"name": cm}}]}}}}
def svc(name):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}}
def kust(level):
    k = {"resources": []}
    if random.random() < 0.5: k["namePrefix"] = random.choice(["a-", "b-", "site-"])
    if random.random() < 0.4: k["nameSuffix"] = random.choice(["-x", "-v2"])
    if random.random() < 0.5: k["namespace"] = random.choice(["edge", "store-1"])
    if random.random() < 0.4: k["commonLabels"] = {"lvl": str(level)}
    if random.random() < 0.4: k["labels"] = [{"pairs": {"l%d" % level: "v"}, "includeSelectors": random.random() < 0.5, "includeTemplates": random.random() < 0.5}]
    if random.random() < 0.4: k["commonAnnotations"] = {"a%d" % level: "yes"}
    if random.random() < 0.4: k["images"] = [{"name": "nginx", **random.choice([{"newTag": "1.%d" % level}, {"newName": "m/nginx"}, {"digest": "sha256:" + "a" * 64}])}]
    return k
def build_tree(root):
    os.makedirs(root + "/base")
    names = ["web", "api"][: random.randint(1, 2)]
    global kinds
    kinds = {}
    base = kust(0)
    docs = []
    for n in names:
        docs.append(dep(n, "cfg", "sec", random.choice(["nginx", "nginx:1.0", "busybox:1"])))
        kinds[n] = docs[-1]["kind"]
        if random.random() < 0.7: docs.append(svc(n))
    docs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}})
    if random.random() < 0.5:
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "ing"}, "spec": {"rules": [{"http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": names[0], "port": {"number": 80}}}}]}}]}})
    if random.random() < 0.5:
        docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        docs[0]["spec"]["template"]["spec"]["volumes"].append({"name": "d", "persistentVolumeClaim": {"claimName": "data"}})
    open(root + "/base/r.yaml", "w").write(yaml.safe_dump_all(docs))
    base["resources"] = ["r.yaml"]
    base["configMapGenerator"] = [{"name": "cfg", "literals": ["A=1", "B=two"]}]
    base["secretGenerator"] = [{"name": "sec", "literals": ["k=v"]}]
    if random.random() < 0.3: base["generatorOptions"] = {"disableNameSuffixHash": True}
    yaml.safe_dump(base, open(root + "/base/kustomization.yaml", "w"))
    prev = "base"
    for lvl in range(1, random.randint(1, 3) + 1):
        d = "o%d" % lvl
        os.makedirs(root + "/" + d)
        k = kust(lvl)
        k["resources"] = ["../" + prev]
        if random.random() < 0.6:
            k["configMapGenerator"] = [{"name": "cfg", "behavior": random.choice(["merge", "replace"]), "literals": ["B=%d" % lvl, "C=c"]}]
        if random.random() < 0.5:
            k["patches"] = [{"target": {"kind": random.choice(["Deployment", "StatefulSet|DaemonSet", "Service"])}, "patch": random.choice([
                "- op: add\n  path: /metadata/annotations\n  value: {p: x}\n",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: any\nspec:\n  template:\n    spec:\n      containers:\n      - name: side\n        image: nginx:2\n"])}]
            if "Service" in k["patches"][0]["target"]["kind"] and not k["patches"][0]["patch"].startswith("-"):
                k["patches"][0]["target"]["kind"] = "Deployment"
        if random.random() < 0.3:
            k["replicas"] = [{"name": random.choice(names), "count": 3}]
        if random.random() < 0.3:
            os.makedirs(root + "/comp%d" % lvl)
            yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component",
                            "configMapGenerator": [{"name": "cfg", "behavior": "merge", "literals": ["COMP=%d" % lvl]}],
                            "patches": [{"target": {"kind": "Deployment|StatefulSet|DaemonSet"}, "patch":
                                "- op: add\n  path: /spec/template/spec/containers/0/env/-\n  value: {name: FROM_COMPONENT, value: x}\n"}]},
                           open(root + "/comp%d/kustomization.yaml" % lvl, "w"))
            k["components"] = ["../comp%d" % lvl]
        if random.random() < 0.3:
            k.setdefault("patches", []).append({"patch": "apiVersion: apps/v1\nkind: %s\nmetadata:\n  name: %s\nspec:\n  template:\n    spec:\n      containers:\n      - name: main\n        env:\n        - name: NEW\n          value: n\n        - name: S\n          valueFrom: null\n          value: plain\n" % (kinds[names[0]], names[0])})
        yaml.safe_dump(k, open(root + "/" + d + "/kustomization.yaml", "w"))
        prev = d
    return root + "/" + prev
bad = 0
for i in range(N):
    root = os.path.join(WORK, "t%d" % i)
    shutil.rmtree(root, ignore_errors=True)
    top = build_tree(root)
    a = subprocess.run([KUBECTL, "kustomize", top], capture_output=True, text=True)
    b = subprocess.run([OURS, "kustomize", "build", top], capture_output=True, text=True)
    if a.returncode != 0 or b.returncode != 0:
        if (a.returncode == 0) != (b.returncode == 0):
            bad += 1
            print("EXIT MISMATCH", root, a.returncode, b.returncode, a.stderr[-300:], b.stderr[-300:])
        continue
    A = list(yaml.safe_load_all(a.stdout)); B = list(yaml.safe_load_all(b.stdout))
    if A != B:
        bad += 1
        print("DIFF", root)
print("mismatches:", bad, "of", N)
