//! Listener options: TLS on the inbound listener, and `/metrics` served on a listener apart.

use crate::common::*;

#[tokio::test]
async fn tls_listener_serves_webhooks() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let t = spawn_with(Setup {
        inbound: format!(
            "  tls: {{ cert: {}, key: {} }}\n",
            cert_path.display(),
            key_path.display()
        ),
        ..Setup::default()
    })
    .await;
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", t.addr)
        .build()
        .unwrap();
    let body = testdata("github/ping.json");
    let hook = Hook::github("ping", "tls-1", &body, GITHUB_SECRET_NEW);
    let resp = send(
        &https,
        &format!("https://localhost:{}", t.addr.port()),
        &hook,
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    // Plain HTTP on the TLS port gets nowhere.
    assert!(client().get(t.url("/healthz")).send().await.is_err());
}

#[tokio::test]
async fn metrics_can_have_a_listener_of_their_own() {
    let mut t = spawn().await;
    assert_eq!(t.get("/metrics").await.0, 200);
    t.stop().await;

    let t = spawn_with(Setup {
        top: "metrics:\n  listen: 127.0.0.1:0\n".into(),
        ..Setup::default()
    })
    .await;
    let metrics_addr = t
        .relay
        .as_ref()
        .and_then(|r| r.metrics_addr)
        .expect("metrics listener");
    assert_eq!(t.get("/metrics").await.0, 404);
    let text = get_text(&format!("http://{metrics_addr}/metrics")).await;
    assert!(text.contains("p0_relay_build_info"), "{text}");
    // The probes too, so that they need no place among the senders' connections.
    for path in ["/healthz", "/readyz"] {
        let main = client().get(t.url(path)).send().await.unwrap();
        let apart = client()
            .get(format!("http://{metrics_addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (main.status().as_u16(), apart.status().as_u16()),
            (200, 200),
            "{path}"
        );
        assert_eq!(
            main.text().await.unwrap(),
            apart.text().await.unwrap(),
            "{path}"
        );
    }
    let readyz = get_text(&format!("http://{metrics_addr}/readyz")).await;
    assert!(readyz.contains("\"sources\""), "{readyz}");
    assert_eq!(
        client()
            .post(format!("http://{metrics_addr}/webhooks/github"))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "webhooks only on the main listener"
    );
}
