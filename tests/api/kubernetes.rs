//! The Kubernetes manifests in `deploy/kubernetes`: valid against Kubernetes' own schemas
//! (`kubernetes-validate --strict`, oldest and newest release it bundles that we support), and
//! consistent with one another, the image and the relay where no schema can tell (selectors,
//! port names, probe paths, the Secret's keys and the README's command that creates it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::*;

/// The Kubernetes releases the manifests are checked against.
const VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The overlay that adds the Prometheus Operator's ServiceMonitor to the base.
const OVERLAY: &str = "prometheus-operator";

/// The base kustomization, and each manifest it or the overlay lists, by path under
/// `deploy/kubernetes`.
fn shipped() -> (Value, Vec<(String, Value)>) {
    let kustomization = yaml(&dir().join("kustomization.yaml"));
    let overlay = yaml(&dir().join(OVERLAY).join("kustomization.yaml"));
    assert!(
        overlay["resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r == "..")),
        "{OVERLAY}/kustomization.yaml builds on the base"
    );
    let mut docs = Vec::new();
    for (at, k) in [("", &kustomization), (OVERLAY, &overlay)] {
        for f in k["resources"].as_array().expect("kustomization: resources") {
            let f = f.as_str().expect("a resource is a path");
            if f == ".." {
                continue;
            }
            let path = if at.is_empty() {
                f.to_owned()
            } else {
                format!("{at}/{f}")
            };
            docs.push((path.clone(), yaml(&dir().join(&path))));
        }
    }
    (kustomization, docs)
}

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Option<&'a Value> {
    docs.iter().map(|(_, d)| d).find(|d| d["kind"] == kind)
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

/// The port number at the end of an address such as `0.0.0.0:9090`.
fn port_of(addr: &str) -> Option<u64> {
    addr.rsplit(':').next()?.parse().ok()
}

/// What does not hang together in the manifests, one line each; empty when all is well.
/// `readme` is the README's text (the command that creates the Secret), `dockerfile` the
/// image's (its user), `relay_yaml` the shipped config (its listen port), `alerts` the
/// alerting rules (the `job` they ask for).
fn problems(
    kustomization: &Value,
    docs: &[(String, Value)],
    files_on_disk: &BTreeSet<String>,
    readme: &str,
    dockerfile: &str,
    relay_yaml: &str,
    alerts: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut fail = |m: String| out.push(m);

    let listed: BTreeSet<String> = docs.iter().map(|(f, _)| f.clone()).collect();
    for f in files_on_disk.difference(&listed) {
        fail(format!("{f} is not among the kustomizations' resources"));
    }
    let need = [
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
    ];
    for kind in need {
        if of_kind(docs, kind).is_none() {
            fail(format!("no {kind}"));
        }
    }
    let (Some(config), Some(deploy), Some(pdb), Some(monitor)) = (
        of_kind(docs, "ConfigMap"),
        of_kind(docs, "Deployment"),
        of_kind(docs, "PodDisruptionBudget"),
        of_kind(docs, "ServiceMonitor"),
    ) else {
        return out;
    };

    // The Deployment: two relays or more, on PostgreSQL, non-root, read-only.
    let spec = &deploy["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    if spec["replicas"].as_u64().unwrap_or(1) < 2 {
        fail("Deployment: fewer than 2 replicas".into());
    }
    if !selects(&spec["selector"]["matchLabels"], pod_labels) {
        fail("Deployment: selector does not match the pod's labels".into());
    }
    let image_user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .and_then(|u| u.split(':').next())
        .and_then(|u| u.trim().parse::<u64>().ok());
    let security = &pod["securityContext"];
    if security["runAsNonRoot"] != true {
        fail("Deployment: pod securityContext.runAsNonRoot is not true".into());
    }
    if security["runAsUser"].as_u64() != image_user || image_user.is_none_or(|u| u == 0) {
        fail(format!(
            "Deployment: runAsUser {} is not the image's non-root USER {image_user:?}",
            security["runAsUser"]
        ));
    }
    let containers = pod["containers"].as_array().cloned().unwrap_or_default();
    let Some(relay) = containers.first() else {
        fail("Deployment: no container".into());
        return out;
    };
    let c_security = &relay["securityContext"];
    if c_security["readOnlyRootFilesystem"] != true {
        fail("Deployment: readOnlyRootFilesystem is not true".into());
    }
    if c_security["allowPrivilegeEscalation"] != false {
        fail("Deployment: allowPrivilegeEscalation is not false".into());
    }
    if !c_security["capabilities"]["drop"]
        .as_array()
        .is_some_and(|d| d.iter().any(|c| c == "ALL"))
    {
        fail("Deployment: capabilities do not drop ALL".into());
    }
    let kustomized = kustomization["images"]
        .as_array()
        .is_some_and(|i| i.iter().any(|i| i["name"] == relay["image"]));
    if !kustomized {
        fail(format!(
            "Deployment: image {} is not named in kustomization.yaml's images",
            relay["image"]
        ));
    }

    // Ports: `http` is the relay's listen port, `metrics` the metrics listener's.
    let container_port = |name: &str| {
        relay["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .and_then(|p| p["containerPort"].as_u64())
    };
    let listen_port = relay_yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen: \"${P0_RELAY_LISTEN:-"))
        .and_then(|rest| rest.split('}').next())
        .and_then(port_of);
    if container_port("http").is_none() || container_port("http") != listen_port {
        fail(format!(
            "Deployment: port `http` {:?} is not the relay's listen port {listen_port:?}",
            container_port("http")
        ));
    }
    let metrics_port = config["data"]["P0_RELAY_METRICS_LISTEN"]
        .as_str()
        .and_then(port_of);
    if container_port("metrics").is_none() || container_port("metrics") != metrics_port {
        fail(format!(
            "Deployment: port `metrics` {:?} is not P0_RELAY_METRICS_LISTEN's {metrics_port:?}",
            container_port("metrics")
        ));
    }
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &relay[probe]["httpGet"];
        // On the metrics listener: the senders' connections cannot starve it.
        if get["path"] != path || get["port"] != "metrics" {
            fail(format!(
                "Deployment: {probe} is not GET {path} on port `metrics`: {get}"
            ));
        }
    }
    let resources = &relay["resources"];
    for at in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
        if resources.pointer(at).is_none() {
            fail(format!("Deployment: no resources{}", at.replace('/', ".")));
        }
    }

    // Settings from the ConfigMap, secrets as files from the Secret.
    let from_config = relay["envFrom"].as_array().is_some_and(|e| {
        e.iter()
            .any(|e| e["configMapRef"]["name"] == config["metadata"]["name"])
    });
    if !from_config {
        fail("Deployment: envFrom does not name the ConfigMap".into());
    }
    let table: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    for key in config["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        if !table.iter().any(|l| l.contains(&format!("`{key}`"))) {
            fail(format!(
                "ConfigMap: {key} is not a variable of the README's table"
            ));
        }
        if ["TOKEN", "SECRET", "P0_RELAY_DB", "KEY"]
            .iter()
            .any(|s| key.contains(s))
        {
            fail(format!(
                "ConfigMap: {key} is a secret; it belongs in the Secret"
            ));
        }
    }
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let secret_volume = volumes.iter().find(|v| v["secret"].is_object());
    let secret_name = secret_volume.and_then(|v| v["secret"]["secretName"].as_str());
    let mount = secret_volume.and_then(|v| {
        relay["volumeMounts"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == v["name"])?["mountPath"]
            .as_str()
    });
    let mut keys = BTreeSet::new();
    for var in relay["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default();
        let Some(secret) = name.strip_suffix("_FILE") else {
            fail(format!(
                "Deployment: {name} is set in the manifest, not from a file"
            ));
            continue;
        };
        let want = mount.map(|m| format!("{m}/{secret}"));
        if var["value"].as_str() != want.as_deref() {
            fail(format!(
                "Deployment: {name} is {}, not the Secret's key {secret} ({want:?})",
                var["value"]
            ));
        }
        keys.insert(secret.to_owned());
    }
    if !keys.contains("P0_RELAY_DB") {
        fail("Deployment: no P0_RELAY_DB_FILE: the relays would not share PostgreSQL".into());
    }
    // The kubelet writes the Secret's files as root's, with defaultMode (0644 when unset) and
    // the pod's fsGroup as their group: the relay's user must be able to read them.
    let mode = secret_volume
        .and_then(|v| v["secret"]["defaultMode"].as_u64())
        .unwrap_or(0o644);
    let by_group = mode & 0o040 != 0 && security["fsGroup"].as_u64().is_some();
    if mode & 0o004 == 0 && !by_group {
        fail(format!(
            "Deployment: the Secret's files (mode {mode:o}, root's) are unreadable by user \
             {}: set fsGroup, with group read in defaultMode",
            security["runAsUser"]
        ));
    }
    match secret_name {
        None => fail("Deployment: no Secret volume".into()),
        Some(secret_name) => {
            let command = format!("create secret generic {secret_name}");
            let created: BTreeSet<String> = readme
                .split(&command)
                .nth(1)
                .map(|rest| {
                    rest.lines()
                        .take_while(|l| l.trim_end().ends_with('\\') || !l.trim().is_empty())
                        .take_while(|l| !l.contains("```"))
                        .flat_map(|l| l.split_whitespace())
                        .filter_map(|w| {
                            let kv = w
                                .strip_prefix("--from-file=")
                                .or_else(|| w.strip_prefix("--from-literal="))?;
                            Some(kv.split('=').next()?.trim_matches('\'').to_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            if created != keys {
                fail(format!(
                    "README: `kubectl {command}` makes keys {created:?}, the Deployment reads {keys:?}"
                ));
            }
        }
    }

    // The Services, the budget and the monitor find the relays; webhooks and metrics are
    // exposed apart, so that exposing one never exposes the other.
    let services: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == "Service")
        .collect();
    let targets = |svc: &Value| -> Vec<String> {
        svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["targetPort"].as_str().map(str::to_owned))
            .collect()
    };
    for svc in &services {
        let name = &svc["metadata"]["name"];
        if !selects(&svc["spec"]["selector"], pod_labels) {
            fail(format!(
                "Service {name}: selector does not match the pod's labels"
            ));
        }
        let t = targets(svc);
        for target in &t {
            if container_port(target).is_none() {
                fail(format!(
                    "Service {name}: targetPort {target} is no container port"
                ));
            }
        }
        if t.iter().any(|t| t == "http") && t.iter().any(|t| t == "metrics") {
            fail(format!(
                "Service {name}: exposes both the webhooks and the metrics"
            ));
        }
    }
    if !services
        .iter()
        .any(|s| targets(s).iter().any(|t| t == "http"))
    {
        fail("no Service exposes the webhook port `http`".into());
    }
    if !selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels) {
        fail("PodDisruptionBudget: selector does not match the pod's labels".into());
    }
    let min = pdb["spec"]["minAvailable"].as_u64().unwrap_or(0);
    if min < 1 || min >= spec["replicas"].as_u64().unwrap_or(1) {
        fail(format!(
            "PodDisruptionBudget: minAvailable {min} is not at least 1 and below the replicas"
        ));
    }
    if pdb["spec"]["unhealthyPodEvictionPolicy"] != "AlwaysAllow" {
        fail("PodDisruptionBudget: relays not ready (the database down) would block drains".into());
    }
    let scraped: Vec<&&Value> = services
        .iter()
        .filter(|s| {
            selects(
                &monitor["spec"]["selector"]["matchLabels"],
                &s["metadata"]["labels"],
            )
        })
        .collect();
    if scraped.is_empty() {
        fail("ServiceMonitor: selector matches no Service's labels".into());
    }
    // The alerts' `job`: the Prometheus Operator takes it from the Service's `jobLabel`
    // label, and from the Service's name without one.
    let job = |svc: &Value| match monitor["spec"]["jobLabel"].as_str() {
        Some(label) => svc["metadata"]["labels"][label].clone(),
        None => svc["metadata"]["name"].clone(),
    };
    let wanted: BTreeSet<String> = alerts
        .split("job=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect();
    if wanted.is_empty() {
        fail(
            "deploy/alerts.yml: no job=\"...\" matcher to check the ServiceMonitor against".into(),
        );
    }
    for svc in &scraped {
        let job = job(svc);
        if wanted.iter().any(|w| job != w.as_str()) {
            fail(format!(
                "ServiceMonitor: Service {}'s series get job {job}, the alerts ask for {wanted:?}",
                svc["metadata"]["name"]
            ));
        }
    }
    for e in monitor["spec"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for svc in &scraped {
            let port = svc["spec"]["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == e["port"]));
            if port.and_then(|p| p["targetPort"].as_str()) != Some("metrics")
                || e["path"] != "/metrics"
            {
                fail(format!(
                    "ServiceMonitor: endpoint {e} is not /metrics on Service {}'s metrics port",
                    svc["metadata"]["name"]
                ));
            }
        }
    }
    out
}

fn problems_of(kustomization: &Value, docs: &[(String, Value)]) -> Vec<String> {
    let mut on_disk = BTreeSet::new();
    for at in ["", OVERLAY] {
        for e in std::fs::read_dir(dir().join(at)).unwrap() {
            let f = e.unwrap().file_name().into_string().unwrap();
            if f.ends_with(".yaml") && f != "kustomization.yaml" {
                on_disk.insert(if at.is_empty() {
                    f
                } else {
                    format!("{at}/{f}")
                });
            }
        }
    }
    let read = |f: &str| std::fs::read_to_string(repo().join(f)).unwrap();
    problems(
        kustomization,
        docs,
        &on_disk,
        &read("README.md"),
        &read("Dockerfile"),
        &read("relay.yaml"),
        &read("deploy/alerts.yml"),
    )
}

#[test]
fn the_manifests_hang_together() {
    let (kustomization, docs) = shipped();
    assert_eq!(problems_of(&kustomization, &docs), Vec::<String>::new());
}

#[test]
fn a_manifest_that_does_not_hang_together_is_refused() {
    let (kustomization, docs) = shipped();
    type Edit = fn(&mut Value);
    let cases: [(&str, &str, Edit, &str); 14] = [
        (
            "ServiceMonitor",
            "job from the Service's name",
            |d| {
                d["spec"].as_object_mut().unwrap().remove("jobLabel");
            },
            "get job \"p0-relay-metrics\"",
        ),
        (
            "Service",
            "metrics beside the webhooks",
            |d| {
                d["spec"]["ports"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "metrics", "port": 9090, "targetPort": "metrics"}))
            },
            "exposes both",
        ),
        (
            "PodDisruptionBudget",
            "held up by unready relays",
            |d| {
                d["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("unhealthyPodEvictionPolicy");
            },
            "would block drains",
        ),
        (
            "Deployment",
            "secrets unreadable",
            |d| {
                d["spec"]["template"]["spec"]["securityContext"]
                    .as_object_mut()
                    .unwrap()
                    .remove("fsGroup");
            },
            "unreadable by user 10001",
        ),
        (
            "Deployment",
            "one replica",
            |d| d["spec"]["replicas"] = json!(1),
            "fewer than 2 replicas",
        ),
        (
            "Deployment",
            "root",
            |d| d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = json!(0),
            "runAsUser 0",
        ),
        (
            "Deployment",
            "writable root",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] =
                    json!(false)
            },
            "readOnlyRootFilesystem",
        ),
        (
            "Deployment",
            "readiness on /healthz",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] =
                    json!("/healthz")
            },
            "readinessProbe",
        ),
        (
            "Deployment",
            "liveness on another port",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] =
                    json!("http")
            },
            "livenessProbe",
        ),
        (
            "Deployment",
            "a secret in plain env",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["env"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "P0_API_TOKEN", "value": "x"}))
            },
            "P0_API_TOKEN is set in the manifest",
        ),
        (
            "Deployment",
            "a key the README does not create",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["env"].as_array_mut().unwrap().push(json!({"name": "GITHUB_TOKEN_FILE", "value": "/run/secrets/p0-relay/GITHUB_TOKEN"}))
            },
            "README: `kubectl create secret generic p0-relay`",
        ),
        (
            "Service",
            "selects nothing",
            |d| d["spec"]["selector"] = json!({"app.kubernetes.io/name": "relay"}),
            "Service \"p0-relay\": selector",
        ),
        (
            "PodDisruptionBudget",
            "never lets a node drain",
            |d| d["spec"]["minAvailable"] = json!(2),
            "minAvailable 2",
        ),
        (
            "ServiceMonitor",
            "scrapes the webhook port",
            |d| d["spec"]["endpoints"][0]["port"] = json!("http"),
            "ServiceMonitor: endpoint",
        ),
    ];
    for (kind, what, edit, expect) in cases {
        let mut docs = docs.clone();
        let doc = docs
            .iter_mut()
            .map(|(_, d)| d)
            .find(|d| d["kind"] == kind)
            .unwrap();
        edit(doc);
        let found = problems_of(&kustomization, &docs);
        assert!(
            found.iter().any(|p| p.contains(expect)),
            "{kind} ({what}): expected a problem containing {expect:?}, got {found:?}"
        );
    }
    // A manifest left out of the kustomization.
    let fewer: Vec<_> = docs
        .iter()
        .filter(|(f, _)| f != "poddisruptionbudget.yaml")
        .cloned()
        .collect();
    let found = problems_of(&kustomization, &fewer);
    assert!(
        found.contains(
            &"poddisruptionbudget.yaml is not among the kustomizations' resources".to_owned()
        ),
        "{found:?}"
    );
}

/// `kubernetes-validate --strict` against one release: whether it passed, and its output.
fn validate(version: &str, files: &[PathBuf]) -> Option<(bool, String)> {
    let mut args = vec!["--strict", "-k", version];
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(files.iter().map(String::as_str));
    ci_tool("kubernetes-validate", &args, &repo())
}

#[test]
fn the_manifests_match_the_kubernetes_schemas() {
    let (_, docs) = shipped();
    let files: Vec<PathBuf> = docs.iter().map(|(f, _)| dir().join(f)).collect();
    for version in VERSIONS {
        let Some((ok, out)) = validate(version, &files) else {
            return;
        };
        assert!(ok, "against {version}:\n{out}");
        let minor = version.trim_end_matches(".0");
        for (f, d) in &docs {
            let kind = d["kind"].as_str().unwrap().to_lowercase();
            // The Prometheus Operator's kind has no schema in the bundle (the tool warns);
            // its fields are checked above against the Service it scrapes.
            if kind == "servicemonitor" {
                continue;
            }
            let name = d["metadata"]["name"].as_str().unwrap();
            assert!(
                out.contains(&format!(
                    "{f} passed for resource {kind}/{name} against version {minor}"
                )),
                "{f} against {version}:\n{out}"
            );
        }
    }
}

#[test]
fn the_schema_validation_refuses_a_broken_manifest() {
    let deployment = std::fs::read_to_string(dir().join("deployment.yaml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (what, from, to, expect) in [
        (
            "a misspelt field",
            "  replicas: 2",
            "  replica: 2",
            "'replica' was unexpected",
        ),
        (
            "a port that is a string",
            "containerPort: 8080",
            "containerPort: \"8080\"",
            "is not of type 'integer'",
        ),
        (
            "a probe without a handler's port",
            "              path: /readyz\n              port: metrics\n",
            "              path: /readyz\n",
            "'port' is a required property",
        ),
    ] {
        assert!(
            deployment.contains(from),
            "{what}: {from:?} not in deployment.yaml"
        );
        let broken = tmp.path().join("deployment.yaml");
        std::fs::write(&broken, deployment.replacen(from, to, 1)).unwrap();
        let Some((ok, out)) = validate(VERSIONS[0], &[broken]) else {
            return;
        };
        assert!(!ok, "{what} passed:\n{out}");
        assert!(out.contains(expect), "{what}:\n{out}");
    }
}
