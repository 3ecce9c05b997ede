//! The container image as platform teams run it, on a real Docker engine: the Dockerfile's
//! runtime (`--target runtime-base`) with the binary these tests built, run as its non-root user
//! with its secrets as files and its store on a volume, healthy by Docker's own health check,
//! a signed delivery accepted and sent to a fake P0, stopped by SIGTERM, its decision read
//! back from the volume and the delivery a duplicate after a restart; and a Dockerfile whose
//! health check asks the wrong address seen `unhealthy`. `.ci/run` starts the engine and,
//! where no registry is reachable, makes the base image from Debian's packages
//! (`P0_RELAY_TEST_BASE_IMAGE`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::pg;
use crate::common::*;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Runs `docker` with `args`: whether it succeeded, and its stdout (stderr after it).
fn docker(args: &[&str]) -> (bool, String) {
    let o = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
    let mut text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() && !err.trim().is_empty() {
        text = format!("{text}\n{}", err.trim());
    }
    (o.status.success(), text)
}

/// `docker` that must succeed.
fn docker_ok(args: &[&str]) -> String {
    let (ok, out) = docker(args);
    assert!(ok, "docker {args:?} failed:\n{out}");
    out
}

/// Whether a Docker engine answers; without one the test is skipped (CI always has one).
fn engine() -> bool {
    let up = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        crate::common::skip::skip("a Docker engine");
    }
    up
}

/// Removes what a test made, whatever happened to it.
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        for i in &self.images {
            let _ = docker(&["rmi", "-f", i]);
        }
    }
}

/// Builds the Dockerfile (`dockerfile`, its text) to its `runtime-base` stage, then that with
/// the binary these tests run as `/usr/local/bin/p0-relay`, each in a context of its own;
/// returns the image's tag.
fn build(name: &str, dockerfile: &str, cleanup: &mut Cleanup) -> String {
    let pid = std::process::id();
    let base_tag = format!("p0-relay-test/{name}-base:{pid}");
    let tag = format!("p0-relay-test/{name}:{pid}");
    cleanup.images.push(tag.clone());
    cleanup.images.push(base_tag.clone());

    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    std::fs::copy(repo().join("relay.yaml"), ctx.path().join("relay.yaml")).unwrap();
    copy_dir(&repo().join("mappings"), &ctx.path().join("mappings"));
    let mut args = vec!["build", "-q", "--target", "runtime-base", "-t", &base_tag];
    let base = std::env::var("P0_RELAY_TEST_BASE_IMAGE").ok();
    let base_arg = base.as_ref().map(|b| format!("BASE_IMAGE={b}"));
    if let Some(arg) = &base_arg {
        args.extend(["--build-arg", arg]);
    }
    let path = ctx.path().display().to_string();
    args.push(&path);
    docker_ok(&args);

    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {base_tag}\nCOPY p0-relay /usr/local/bin/p0-relay\n"),
    )
    .unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_p0-relay"), ctx.path().join("p0-relay")).unwrap();
    let path = ctx.path().display().to_string();
    docker_ok(&["build", "-q", "-t", &tag, &path]);
    tag
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn inspect(container: &str, format: &str) -> String {
    docker_ok(&["inspect", "--format", format, container])
}

/// What the container printed, both streams.
fn logs(container: &str) -> String {
    Command::new("docker")
        .args(["logs", container])
        .output()
        .map(|o| String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned())
        .unwrap_or_default()
}

/// `http://ADDRESS` where this machine reaches the container's `port`.
fn published(container: &str, port: u64) -> String {
    let (ok, out) = docker(&["port", container, &format!("{port}/tcp")]);
    assert!(
        ok,
        "{container}: port {port} not published ({out}); it is {}; its log:\n{}",
        inspect(container, "{{.State.Status}} (exit {{.State.ExitCode}})"),
        logs(container)
    );
    format!("http://{}", out.lines().next().unwrap_or_default())
}

/// Waits until Docker reports the container's health as `want` (within `limit`), failing at
/// once if the container exits or reports the other verdict.
fn wait_health(container: &str, want: &str, limit: Duration) {
    let other = if want == "healthy" {
        "unhealthy"
    } else {
        "healthy"
    };
    let deadline = Instant::now() + limit;
    loop {
        let state = inspect(container, "{{.State.Status}} {{.State.Health.Status}}");
        if state == format!("running {want}") {
            return;
        }
        let logs = || logs(container);
        assert!(
            state.starts_with("running") && !state.ends_with(&format!(" {other}")),
            "{container} is {state}, not {want}; its log:\n{}",
            logs()
        );
        assert!(
            Instant::now() < deadline,
            "{container} still {state} after {limit:?}; its log:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The address on which containers on the default bridge reach this machine: its gateway,
/// which older engines leave out of the network's description (then the subnet's first
/// address, where Docker puts it).
fn bridge_gateway() -> String {
    let config = docker_ok(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}}{{end}}",
    ]);
    let mut parts = config.split_whitespace();
    let (first, subnet) = (parts.next().unwrap_or(""), parts.next());
    if first.parse::<std::net::Ipv4Addr>().is_ok() && subnet.is_some() {
        return first.to_owned();
    }
    let net: std::net::Ipv4Addr = first
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the bridge network's subnet: {config:?}"));
    std::net::Ipv4Addr::from(u32::from(net) + 1).to_string()
}

/// A fake P0 listening on `ip` (the bridge's gateway), answering every call 200.
async fn p0_on(ip: &str) -> MockServer {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let p0 = MockServer::builder().listener(listener).start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true})))
        .mount(&p0)
        .await;
    p0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_healthy_non_root_and_keeps_its_decisions_across_a_stop() {
    if !engine() {
        return;
    }
    let mut cleanup = Cleanup::default();
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let image = build("relay", &dockerfile, &mut cleanup);
    assert_eq!(inspect(&image, "{{.Config.User}}"), "10001:10001");

    // A fake P0 the container reaches over Docker's bridge.
    let gateway = bridge_gateway();
    let p0 = p0_on(&gateway).await;

    // Secrets as files, as Docker and Kubernetes mount them, readable by the image's user.
    let secrets = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("P0_API_TOKEN", TOKEN),
        ("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET_NEW),
        ("PAGERDUTY_WEBHOOK_SECRET", PD_SECRET),
        ("OPSGENIE_WEBHOOK_TOKEN", OG_TOKEN),
    ] {
        std::fs::write(secrets.path().join(name), format!("{value}\n")).unwrap();
    }
    let mut perms = std::fs::metadata(secrets.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(secrets.path(), perms).unwrap();

    let id = std::process::id();
    let name = format!("p0-relay-test-{id}");
    let volume = format!("p0-relay-test-data-{id}");
    cleanup.containers.push(name.clone());
    cleanup.volumes.push(volume.clone());
    let data = format!("{volume}:/app/data");
    let secrets_mount = format!("{}:/run/secrets/p0-relay:ro", secrets.path().display());
    let p0_url = format!("P0_BASE_URL={}", p0.uri());
    let org = format!("P0_ORG_ID={ORG}");
    let file_vars: Vec<String> = [
        "P0_API_TOKEN",
        "GITHUB_WEBHOOK_SECRET",
        "PAGERDUTY_WEBHOOK_SECRET",
        "OPSGENIE_WEBHOOK_TOKEN",
    ]
    .iter()
    .map(|v| format!("{v}_FILE=/run/secrets/p0-relay/{v}"))
    .collect();
    let mut run = vec![
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        "127.0.0.1::8080",
        "-v",
        &data,
        "-v",
        &secrets_mount,
        "-e",
        &org,
        "-e",
        &p0_url,
        "-e",
        "GITHUB_APPROVERS=octocat",
    ];
    for v in &file_vars {
        run.extend(["-e", v]);
    }
    run.push(&image);
    docker_ok(&run);

    // Docker's own health check, on the Dockerfile's own schedule, says healthy.
    wait_health(&name, "healthy", Duration::from_secs(60));
    assert_eq!(docker_ok(&["exec", &name, "id", "-u"]), "10001");
    let base = published(&name, 8080);

    // A signed, real-size GitHub comment: accepted, and its decision reaches P0.
    let hook = Hook::comment("container-1", "/p0 approve req-container 2h");
    assert!(hook.body.len() > 10_000, "a real-size delivery");
    let (status, body) = answer(send(&client(), &base, &hook).await).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "accepted", "{body}");
    let calls = wait_for_p0_calls(&p0, 1).await;
    let expected = vec![call(
        "approve",
        "req-container",
        serde_json::json!({"expirationLength": "2h"}),
    )];
    assert_eq!(summarize(&calls), expected);

    // SIGTERM (docker stop): the relay drains and exits 0, well before Docker would kill it.
    let started = Instant::now();
    docker_ok(&["stop", "--time", "30", &name]);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "stop took {:?}",
        started.elapsed()
    );
    assert_eq!(
        inspect(&name, "{{.State.ExitCode}} {{.State.OOMKilled}}"),
        "0 false"
    );

    // The decision is in the volume, read by the image's own `jobs list`.
    let listed = docker_ok(&[
        "run", "--rm", "-v", &data, "-e", &org, &image, "jobs", "list", "--json",
    ]);
    let jobs: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(jobs.len(), 1, "{listed}");
    assert_eq!(jobs[0]["request_id"], "req-container", "{listed}");
    assert_eq!(jobs[0]["action"], "approve", "{listed}");
    assert_eq!(jobs[0]["state"], "succeeded", "{listed}");
    assert_eq!(jobs[0]["last_status"], 200, "{listed}");

    // Started again on the same volume: the same delivery is a duplicate, P0 is not called
    // again.
    docker_ok(&["start", &name]);
    wait_health(&name, "healthy", Duration::from_secs(60));
    let base = published(&name, 8080);
    let (status, body) = answer(send(&client(), &base, &hook).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "duplicate", "{body}");
    docker_ok(&["stop", "--time", "30", &name]);
    assert_eq!(inspect(&name, "{{.State.ExitCode}}"), "0");
    assert_eq!(summarize(&p0.received_requests().await.unwrap()), expected);
}

#[test]
fn a_health_check_that_asks_the_wrong_address_is_seen_unhealthy() {
    if !engine() {
        return;
    }
    let mut cleanup = Cleanup::default();
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let check = "CMD p0-relay health || exit 1";
    assert!(
        dockerfile.contains(check),
        "the Dockerfile's HEALTHCHECK changed"
    );
    let broken = dockerfile.replace(
        check,
        "CMD p0-relay health --url http://127.0.0.1:9/readyz || exit 1",
    );
    let image = build("broken-health", &broken, &mut cleanup);
    let name = format!("p0-relay-test-broken-{}", std::process::id());
    cleanup.containers.push(name.clone());
    // The relay itself is fine (dry run, demo secrets); only its check is wrong. Checked
    // every second, so that the verdict comes in seconds rather than the image's 40.
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--health-interval",
        "1s",
        "--health-retries",
        "2",
        "--health-start-period",
        "1s",
        "-e",
        "P0_ORG_ID=acme",
        "-e",
        "GITHUB_WEBHOOK_SECRET=s",
        "-e",
        "PAGERDUTY_WEBHOOK_SECRET=s",
        "-e",
        "OPSGENIE_WEBHOOK_TOKEN=s",
        &image,
        "serve",
        "--dry-run",
        "--config",
        "relay.yaml",
    ]);
    wait_health(&name, "unhealthy", Duration::from_secs(30));
    let log = inspect(&name, "{{range .State.Health.Log}}{{.Output}}{{end}}");
    assert!(log.contains("not ready: "), "{log}");
}

fn manifest(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes").join(file)).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// A GET's status code.
async fn status_of(url: &str) -> u16 {
    match client().get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits until GET `url` answers `code` (within 20 s).
async fn wait_status(url: &str, code: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = status_of(url).await;
        if got == code {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} still answers {got}, not {code}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The image run as `deploy/kubernetes/deployment.yaml` runs it: its replicas, arguments,
/// user, read-only root with an empty `/tmp`, no capabilities, no privilege escalation,
/// the ConfigMap's variables and the Secret's keys as files at the mount path, on one
/// PostgreSQL database; probed where its probes ask, scraped where the ServiceMonitor does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_the_kubernetes_deployment_runs_it() {
    if !engine() {
        return;
    }
    let Some(db) = pg::TestDb::create().await else {
        return;
    };
    let mut cleanup = Cleanup::default();
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let image = build("deployment", &dockerfile, &mut cleanup);

    let deployment = manifest("deployment.yaml");
    let config = manifest("configmap.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let relay = &pod["containers"][0];
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    let user = format!(
        "{}:{}",
        pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    );
    let security = &relay["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    let port = |name: &str| {
        relay["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    let (http_port, metrics_port) = (port("http"), port("metrics"));
    // Each probe: its path, and which port (by name) it asks.
    let probe = |name: &str| {
        let get = &relay[name]["httpGet"];
        let (path, port) = (get["path"].as_str().unwrap(), get["port"].as_str().unwrap());
        (path.to_owned(), port.to_owned())
    };
    let (liveness, readiness) = (probe("livenessProbe"), probe("readinessProbe"));
    // The container's memory limit, in Docker's units.
    let memory = relay["resources"]["limits"]["memory"]
        .as_str()
        .unwrap()
        .replace("Mi", "m")
        .replace("Gi", "g");

    // The containers reach P0 and PostgreSQL over Docker's bridge.
    let gateway = bridge_gateway();
    let p0 = p0_on(&gateway).await;
    let proxy = pg::Proxy::start_on(gateway.parse().unwrap(), db.server()).await;

    // The Secret's keys, each a file at the mount path.
    let mount = relay["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "secrets")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    // As the kubelet writes them: owned by root, the volume's defaultMode, the pod's
    // fsGroup as their group (and a supplementary group of the container's).
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "secrets")
        .unwrap();
    let mode = volume["secret"]["defaultMode"].as_u64().unwrap() as u32;
    let fs_group = pod["securityContext"]["fsGroup"].as_u64().map(|g| g as u32);
    let secrets = tempfile::tempdir().unwrap();
    let db_url = db.url_via(proxy.addr);
    for (key, value) in [
        ("P0_RELAY_DB", db_url.as_str()),
        ("P0_API_TOKEN", TOKEN),
        ("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET_NEW),
        ("PAGERDUTY_WEBHOOK_SECRET", PD_SECRET),
        ("OPSGENIE_WEBHOOK_TOKEN", OG_TOKEN),
        ("P0_RELAY_AUDIT_KEY", "container-audit-key-0123456789"),
    ] {
        let file = secrets.path().join(key);
        std::fs::write(&file, value).unwrap();
        std::os::unix::fs::chown(&file, Some(0), fs_group)
            .expect("the container test runs as root, as the Docker engine does");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // The ConfigMap's variables, with this test's org, approver and P0; then the Deployment's.
    let mut env: Vec<String> = config["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| match k.as_str() {
            "P0_ORG_ID" => format!("{k}={ORG}"),
            "GITHUB_APPROVERS" => format!("{k}=octocat"),
            _ => format!("{k}={}", v.as_str().unwrap()),
        })
        .collect();
    env.push(format!("P0_BASE_URL={}", p0.uri()));
    for var in relay["env"].as_array().unwrap() {
        env.push(format!(
            "{}={}",
            var["name"].as_str().unwrap(),
            var["value"].as_str().unwrap()
        ));
    }
    let args: Vec<String> = relay["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();

    let empty = tempfile::tempdir().unwrap();
    let mut bases = Vec::new();
    for n in 0..replicas {
        let name = format!("p0-relay-test-pod{n}-{}", std::process::id());
        cleanup.containers.push(name.clone());
        let secrets_mount = format!("{}:{mount}:ro", secrets.path().display());
        let data_mount = format!("{}:/app/data:ro", empty.path().display());
        let publish_http = format!("127.0.0.1::{http_port}");
        let publish_metrics = format!("127.0.0.1::{metrics_port}");
        // The kubelet adds fsGroup to the container's groups.
        let groups = fs_group.map(|g| g.to_string());
        let mut run = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--user",
            &user,
            "--memory",
            &memory,
            "--read-only",
            "--tmpfs",
            "/tmp",
            // Kubernetes ignores the image's VOLUME: /app/data is as read-only as the rest
            // (an empty folder mounted read-only over the anonymous volume Docker would add).
            "-v",
            &data_mount,
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-p",
            &publish_http,
            "-p",
            &publish_metrics,
            "-v",
            &secrets_mount,
        ];
        if let Some(g) = &groups {
            run.extend(["--group-add", g]);
        }
        for e in &env {
            run.extend(["-e", e]);
        }
        run.push(&image);
        run.extend(args.iter().map(String::as_str));
        docker_ok(&run);
        bases.push((
            name.clone(),
            published(&name, http_port),
            published(&name, metrics_port),
        ));
    }
    // The URL where the kubelet's probe `(path, port)` asks replica `n`.
    let probe_url = |n: usize, (path, port): &(String, String)| {
        let (_, http, metrics) = &bases[n];
        let base = match port.as_str() {
            "http" => http,
            "metrics" => metrics,
            other => panic!("a probe on port {other}"),
        };
        format!("{base}{path}")
    };
    for (n, (name, base, metrics)) in bases.iter().enumerate() {
        wait_health(name, "healthy", Duration::from_secs(60));
        assert_eq!(status_of(&probe_url(n, &liveness)).await, 200);
        assert_eq!(status_of(&probe_url(n, &readiness)).await, 200);
        let text = get_text(&format!("{metrics}/metrics")).await;
        assert!(text.contains("p0_relay_webhooks_total{"), "{text}");
        assert_eq!(status_of(&format!("{base}/metrics")).await, 404, "{name}");
    }

    // One store behind both: an approve through one relay, the same delivery again through
    // the other is a duplicate, and a revoke through the other follows the approve.
    let (first, second) = (&bases[0].1, &bases[1].1);
    let approve = Hook::comment("pod-1", "/p0 approve req-pods 2h");
    let (status, body) = answer(send(&client(), first, &approve).await).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("accepted")),
        "{body}"
    );
    let (status, body) = answer(send(&client(), second, &approve).await).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("duplicate")),
        "{body}"
    );
    wait_for_p0_calls(&p0, 1).await;
    let revoke = Hook::comment("pod-2", "/p0 revoke req-pods");
    let (status, body) = answer(send(&client(), second, &revoke).await).await;
    assert_eq!(status, 202, "{body}");
    let calls = wait_for_p0_calls(&p0, 2).await;
    assert_eq!(
        summarize(&calls),
        vec![
            call(
                "approve",
                "req-pods",
                serde_json::json!({"expirationLength": "2h"})
            ),
            call("revoke", "req-pods", serde_json::json!({})),
        ]
    );

    // The database gone: readiness says so (the pod leaves the Service), liveness does not
    // (it is not restarted); back, ready again.
    proxy.cut().await;
    wait_status(&probe_url(0, &readiness), 503).await;
    assert_eq!(status_of(&probe_url(0, &liveness)).await, 200);
    proxy.restore();
    wait_status(&probe_url(0, &readiness), 200).await;

    // Stopped as the kubelet stops a pod: its preStop command, then SIGTERM.
    let pre_stop: Vec<&str> = relay["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for (name, _, _) in &bases {
        let mut exec = vec!["exec", name.as_str()];
        exec.extend(&pre_stop);
        docker_ok(&exec);
        docker_ok(&["stop", "--time", "30", name]);
        assert_eq!(inspect(name, "{{.State.ExitCode}}"), "0", "{name}");
    }
}
