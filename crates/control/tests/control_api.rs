//! The admin API against an in-process control plane: apply (created / configured /
//! unchanged, revisions, generations), 422 with every error and nothing stored,
//! resourceVersion conflicts, get/list/delete, delete-many, diff, watch, status
//! conditions, secret redaction, metrics, and a restart on the same data directory.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod control_util;

use std::time::Duration;

use control_util::*;
use serde_json::Value;

fn base_docs() -> String {
    docs(&[GATEWAY, &backend("echo", 9001), &route("web", "echo", "/")])
}

#[tokio::test]
async fn apply_reports_created_configured_unchanged_with_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;

    let first = cp.apply_ok(&base_docs()).await;
    assert_eq!(
        actions(&first),
        vec![
            ("gw".into(), "created".into()),
            ("echo".into(), "created".into()),
            ("web".into(), "created".into())
        ]
    );
    let r1 = first["revision"].as_u64().unwrap();
    assert!(r1 > 0);
    // One transaction: every document got the same revision.
    for r in first["results"].as_array().unwrap() {
        assert_eq!(r["resourceVersion"], r1.to_string());
        assert_eq!(r["namespace"], "default");
    }

    // Same documents again: no write, no new revision.
    let again = cp.apply_ok(&base_docs()).await;
    assert!(
        actions(&again).iter().all(|(_, a)| a == "unchanged"),
        "{again:#}"
    );
    assert_eq!(again["revision"].as_u64(), Some(r1));
    assert_eq!(cp.revision().await, r1);

    // Change the route only.
    let changed = docs(&[
        GATEWAY,
        &backend("echo", 9001),
        &route("web", "echo", "/api"),
    ]);
    let second = cp.apply_ok(&changed).await;
    assert_eq!(
        actions(&second),
        vec![
            ("gw".into(), "unchanged".into()),
            ("echo".into(), "unchanged".into()),
            ("web".into(), "configured".into())
        ]
    );
    let r2 = second["revision"].as_u64().unwrap();
    assert_eq!(r2, r1 + 1);
    assert_eq!(second["results"][0]["resourceVersion"], r1.to_string());
    assert_eq!(second["results"][2]["resourceVersion"], r2.to_string());

    // Server-set metadata: generation bumped by a spec change, uid and creation time kept.
    let (status, web) = cp.get("/api/v1/httproutes/default/web").await;
    assert_eq!(status, 200);
    let meta = &web["metadata"];
    assert_eq!(meta["resourceVersion"], r2.to_string());
    assert_eq!(meta["generation"], 2);
    assert_eq!(meta["uid"].as_str().unwrap().len(), 32);
    let created = meta["creationTimestamp"].as_str().unwrap().to_owned();
    assert!(created.ends_with('Z') && created.len() == 20, "{created}");

    // A label-only change: configured, generation unchanged.
    let labelled = route("web", "echo", "/api")
        .replace("  name: web\n", "  name: web\n  labels:\n    team: blue\n");
    let third = cp.apply_ok(&labelled).await;
    assert_eq!(actions(&third), vec![("web".into(), "configured".into())]);
    let (_, web) = cp.get("/api/v1/HTTPRoute/default/web").await;
    assert_eq!(web["metadata"]["generation"], 2);
    assert_eq!(web["metadata"]["labels"]["team"], "blue");
    assert_eq!(web["metadata"]["creationTimestamp"], created.as_str());
    assert_eq!(web["metadata"]["uid"], meta["uid"]);

    // dryRun decides but writes nothing.
    let (status, dry) = cp
        .post("/api/v1/apply?dryRun=true", &route("other", "echo", "/"))
        .await;
    assert_eq!(status, 200, "{dry:#}");
    assert_eq!(actions(&dry), vec![("other".into(), "created".into())]);
    assert_eq!(cp.get("/api/v1/httproutes/default/other").await.0, 404);

    // JSON input is accepted too, and a fetched document (with status) applies as is.
    let (_, fetched) = cp.get("/api/v1/httproutes/default/web").await;
    assert!(fetched.get("status").is_some());
    let json_again = cp.apply_ok(&fetched.to_string()).await;
    assert_eq!(
        actions(&json_again),
        vec![("web".into(), "unchanged".into())]
    );

    cp.handle.shutdown().await;
}

#[tokio::test]
async fn invalid_apply_is_refused_with_every_error_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&base_docs()).await;
    let before = cp.revision().await;
    let (_, list_before) = cp.get("/api/v1/httproutes").await;

    let bad_route = route("bad", "echo", "/")
        .replace("      name: echo\n", "      name: echo\n      weight: -3\n");
    let bad_backend = backend("b2", 9002).replace("  endpoints:", "  bogus: 1\n  endpoints:");
    let good = route("fine", "echo", "/fine");
    let body = docs(&[&good, &bad_route, &bad_backend]);
    let (status, err) = cp.apply(&body).await;
    assert_eq!(status, 422, "{err:#}");
    assert_eq!(err["error"], "invalid");
    let errors = err["errors"].as_array().unwrap();
    assert!(errors.len() >= 2, "{err:#}");
    assert!(
        errors.iter().any(|e| e["document"] == 2
            && e["kind"] == "HTTPRoute"
            && e["name"] == "bad"
            && e["path"].as_str().unwrap().contains("weight")),
        "{err:#}"
    );
    assert!(
        errors.iter().any(|e| e["document"] == 3
            && e["kind"] == "Backend"
            && e["path"].as_str().unwrap().contains("bogus")),
        "{err:#}"
    );
    assert_eq!(err["message"], format!("{} errors", errors.len()));

    // Nothing stored: not even the valid document, and no new revision.
    assert_eq!(cp.revision().await, before);
    assert_eq!(cp.get("/api/v1/httproutes/default/fine").await.0, 404);
    let (_, list_after) = cp.get("/api/v1/httproutes").await;
    assert_eq!(list_after["items"], list_before["items"]);

    // Unparseable body: 400.
    let (status, err) = cp.apply("a: [unclosed\n").await;
    assert_eq!(status, 400, "{err:#}");
    assert_eq!(err["error"], "bad_request");
    let (status, _) = cp.apply("").await;
    assert_eq!(status, 400);

    // Duplicate listener ports in one Gateway are an error of that Gateway.
    let dup = GATEWAY.replace(
        "    protocol: HTTP\n",
        "    protocol: HTTP\n  - name: other\n    port: 8080\n    protocol: TCP\n",
    );
    let (status, err) = cp.apply(&dup).await;
    assert_eq!(status, 422, "{err:#}");
    assert!(
        err["errors"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("spec.listeners[1]"),
        "{err:#}"
    );
    assert_eq!(cp.revision().await, before);

    // The metrics count the outcomes.
    let text = cp
        .http
        .get(cp.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("biplane_api_apply_requests_total{outcome=\"invalid\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("biplane_api_apply_requests_total{outcome=\"applied\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("biplane_api_apply_requests_total{outcome=\"bad_request\"} 2"),
        "{text}"
    );
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn resource_version_conflicts_and_put() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    let first = cp.apply_ok(&base_docs()).await;
    let rv = first["results"][2]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();

    let with_rv = |rv: &str, prefix: &str| {
        route("web", "echo", prefix).replace(
            "  name: web\n",
            &format!("  name: web\n  resourceVersion: \"{rv}\"\n"),
        )
    };
    // The right version: configured.
    let ok = cp.apply_ok(&with_rv(&rv, "/v2")).await;
    assert_eq!(actions(&ok), vec![("web".into(), "configured".into())]);
    let before = cp.revision().await;
    // The old version again: 409, nothing stored.
    let (status, err) = cp.apply(&with_rv(&rv, "/v3")).await;
    assert_eq!(status, 409, "{err:#}");
    assert_eq!(err["error"], "conflict");
    assert_eq!(err["kind"], "HTTPRoute");
    assert_eq!(err["name"], "web");
    assert_eq!(cp.revision().await, before);
    // A resourceVersion on something that does not exist: 409 as well.
    let ghost = route("ghost", "echo", "/").replace(
        "  name: ghost\n",
        "  name: ghost\n  resourceVersion: \"1\"\n",
    );
    assert_eq!(cp.apply(&ghost).await.0, 409);

    // PUT: create-or-update one document; the path must agree with the document.
    let (status, body) = cp
        .put(
            "/api/v1/httproutes/default/put-me",
            &route("put-me", "echo", "/p"),
        )
        .await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(actions(&body), vec![("put-me".into(), "created".into())]);
    let (status, body) = cp
        .put(
            "/api/v1/httproutes/default/other-name",
            &route("put-me", "echo", "/p"),
        )
        .await;
    assert_eq!(status, 400, "{body:#}");
    let (status, _) = cp
        .put(
            "/api/v1/backends/default/put-me",
            &route("put-me", "echo", "/p"),
        )
        .await;
    assert_eq!(status, 400);
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn get_list_delete_and_delete_many() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    let in_ns =
        route("zeta", "echo", "/z").replace("  name: zeta\n", "  name: zeta\n  namespace: apps\n");
    cp.apply_ok(&docs(&[
        &base_docs(),
        &route("alpha", "echo", "/a"),
        &in_ns,
        &backend("spare", 9002),
    ]))
    .await;

    let (status, list) = cp.get("/api/v1/httproutes").await;
    assert_eq!(status, 200);
    assert_eq!(list["kind"], "List");
    let names: Vec<(&str, &str)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["metadata"]["namespace"].as_str().unwrap(),
                i["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![("apps", "zeta"), ("default", "alpha"), ("default", "web")]
    );
    let (_, only) = cp.get("/api/v1/HTTPRoute?namespace=apps").await;
    assert_eq!(only["items"].as_array().unwrap().len(), 1);
    let (status, err) = cp.get("/api/v1/services").await;
    assert_eq!(status, 404);
    assert_eq!(err["error"], "unknown_kind");
    let (status, err) = cp.get("/api/v1/backends/default/nope").await;
    assert_eq!(status, 404);
    assert_eq!(err["error"], "not_found");

    // Delete one, with a stale resourceVersion first.
    let (_, alpha) = cp.get("/api/v1/httproutes/default/alpha").await;
    let rv: u64 = alpha["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, _) = cp
        .delete(&format!(
            "/api/v1/httproutes/default/alpha?resourceVersion={}",
            rv + 100
        ))
        .await;
    assert_eq!(status, 409);
    let (status, body) = cp
        .delete(&format!(
            "/api/v1/httproutes/default/alpha?resourceVersion={rv}"
        ))
        .await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["deleted"]["name"], "alpha");
    assert_eq!(body["revision"].as_u64(), Some(cp.revision().await));
    assert_eq!(cp.get("/api/v1/httproutes/default/alpha").await.0, 404);
    assert_eq!(cp.delete("/api/v1/httproutes/default/alpha").await.0, 404);

    // Delete many, atomically: what exists is deleted, the rest reported.
    let before = cp.revision().await;
    let (status, body) = cp
        .post(
            "/api/v1/delete",
            &docs(&[&backend("spare", 1), &in_ns, &route("never", "x", "/")]),
        )
        .await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["revision"].as_u64(), Some(before + 1));
    let acts: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(acts, vec!["deleted", "deleted", "not_found"]);
    assert_eq!(cp.get("/api/v1/backends/default/spare").await.0, 404);
    // A document without a name cannot be deleted: 422, nothing deleted.
    let (status, body) = cp
        .post(
            "/api/v1/delete",
            "kind: Backend\nmetadata: {}\n---\nkind: HTTPRoute\nmetadata: {name: web}\n",
        )
        .await;
    assert_eq!(status, 422, "{body:#}");
    assert_eq!(body["errors"][0]["document"], 1);
    assert_eq!(cp.get("/api/v1/httproutes/default/web").await.0, 200);
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn diff_shows_unified_diffs_of_normalized_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&base_docs()).await;
    let before = cp.revision().await;
    let body = docs(&[
        GATEWAY,
        &route("web", "echo", "/changed"),
        &backend("new", 9009),
    ]);
    let (status, d) = cp.post("/api/v1/diff", &body).await;
    assert_eq!(status, 200, "{d:#}");
    let diffs = d["diffs"].as_array().unwrap();
    assert_eq!(diffs[0]["action"], "unchanged");
    assert_eq!(diffs[0]["diff"], "");
    assert_eq!(diffs[1]["action"], "update");
    let text = diffs[1]["diff"].as_str().unwrap();
    assert!(text.contains("--- a/HTTPRoute/default/web"), "{text}");
    assert!(text.contains("+++ b/HTTPRoute/default/web"), "{text}");
    assert!(text.contains("-        value: /\n"), "{text}");
    assert!(text.contains("+        value: /changed\n"), "{text}");
    assert!(
        !text.contains("uid"),
        "server metadata is not diffed: {text}"
    );
    assert_eq!(diffs[2]["action"], "create");
    assert!(
        diffs[2]["diff"].as_str().unwrap().contains("+  name: new"),
        "{d:#}"
    );
    assert_eq!(cp.revision().await, before, "diff writes nothing");
    // Invalid input: 422 as apply.
    let (status, _) = cp.post("/api/v1/diff", "kind: Backend\napiVersion: biplane.dev/v1alpha1\nmetadata: {name: x}\nspec: {endpoints: [{address: 127.0.0.1, port: 0}]}\n").await;
    assert_eq!(status, 422);
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn watch_streams_changes_as_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    let r1 = cp.apply_ok(&base_docs()).await["revision"]
        .as_u64()
        .unwrap();

    // From a past revision: history first.
    let mut resp = cp
        .http
        .get(cp.url(&format!("/api/v1/watch?revision={}", r1 - 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut buf = String::new();
    let mut lines: Vec<Value> = Vec::new();
    let mut read_lines =
        async |resp: &mut reqwest::Response, want: usize, lines: &mut Vec<Value>| {
            while lines.len() < want {
                let chunk = tokio::time::timeout(WAIT, resp.chunk())
                    .await
                    .expect("no watch event in time")
                    .unwrap()
                    .expect("watch stream ended");
                buf.push_str(std::str::from_utf8(&chunk).unwrap());
                while let Some(i) = buf.find('\n') {
                    let line: String = buf.drain(..=i).collect();
                    lines.push(serde_json::from_str(&line).unwrap());
                }
            }
        };
    read_lines(&mut resp, 3, &mut lines).await;
    assert!(
        lines
            .iter()
            .all(|l| l["type"] == "ADDED" && l["revision"] == r1),
        "{lines:#?}"
    );

    // Live changes follow.
    cp.apply_ok(&route("web", "echo", "/live")).await;
    read_lines(&mut resp, 4, &mut lines).await;
    assert_eq!(lines[3]["type"], "MODIFIED");
    assert_eq!(lines[3]["object"]["metadata"]["name"], "web");
    assert_eq!(
        lines[3]["object"]["metadata"]["resourceVersion"],
        (r1 + 1).to_string()
    );
    cp.delete("/api/v1/backends/default/echo").await;
    read_lines(&mut resp, 5, &mut lines).await;
    assert_eq!(lines[4]["type"], "DELETED");
    assert_eq!(lines[4]["object"]["kind"], "Backend");

    // Filtered by kind, from now.
    let mut only_gw = cp
        .http
        .get(cp.url("/api/v1/watch?kind=gateways"))
        .send()
        .await
        .unwrap();
    cp.apply_ok(&backend("echo", 9001)).await;
    cp.apply_ok(&GATEWAY.replace("port: 8080", "port: 8081"))
        .await;
    let mut gw_lines = Vec::new();
    read_lines(&mut only_gw, 1, &mut gw_lines).await;
    assert_eq!(gw_lines[0]["object"]["kind"], "Gateway");
    assert_eq!(gw_lines[0]["type"], "MODIFIED");

    // Shutdown ends open watches (and does not hang on them).
    tokio::time::timeout(Duration::from_secs(15), cp.handle.shutdown())
        .await
        .expect("shutdown hung on open watches");
}

const FAKE_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";
const FAKE_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEsecret\n-----END PRIVATE KEY-----\n";

fn secret_doc(key: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: tls\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64.encode(FAKE_CERT),
        b64.encode(key)
    )
}

#[tokio::test]
async fn secrets_are_redacted_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&secret_doc(FAKE_KEY)).await;
    let (_, s) = cp.get("/api/v1/secrets/default/tls").await;
    assert_eq!(s["data"]["tls.key"], "<redacted>");
    assert!(s.get("status").is_none());
    let (_, s) = cp.get("/api/v1/secrets/default/tls?showSecrets=true").await;
    assert_ne!(s["data"]["tls.key"], "<redacted>");
    let (_, l) = cp.get("/api/v1/secrets").await;
    assert_eq!(l["items"][0]["data"]["tls.key"], "<redacted>");
    let other = FAKE_KEY.replace("secret", "other0");
    let (_, d) = cp.post("/api/v1/diff", &secret_doc(&other)).await;
    let text = d["diffs"][0]["diff"].as_str().unwrap();
    assert!(
        text.contains("<redacted> (before)") && text.contains("<redacted> (after)"),
        "{text}"
    );
    assert!(
        !text.contains("TUlJRXNlY3JldA"),
        "key material leaked: {text}"
    );
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn route_status_reports_attachment_and_references() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&docs(&[
        GATEWAY,
        &backend("echo", 9001),
        &route("web", "echo", "/"),
        &route("dangling", "missing", "/d"),
        &route("orphan", "echo", "/o").replace("  - name: gw\n", "  - name: nogw\n"),
    ]))
    .await;
    let (_, web) = cp.get("/api/v1/httproutes/default/web").await;
    assert_eq!(condition(&web, "Accepted")["status"], "True");
    assert_eq!(condition(&web, "ResolvedRefs")["status"], "True");
    assert_eq!(condition(&web, "Programmed")["reason"], "NoNodes");
    assert_eq!(condition(&web, "Accepted")["observedGeneration"], 1);

    let (_, dangling) = cp.get("/api/v1/httproutes/default/dangling").await;
    assert_eq!(condition(&dangling, "Accepted")["status"], "True");
    let rr = condition(&dangling, "ResolvedRefs");
    assert_eq!(rr["status"], "False");
    assert_eq!(rr["reason"], "BackendNotFound");
    assert!(
        rr["message"].as_str().unwrap().contains("default/missing"),
        "{rr}"
    );

    let (_, orphan) = cp.get("/api/v1/httproutes/default/orphan").await;
    let acc = condition(&orphan, "Accepted");
    assert_eq!(acc["status"], "False");
    assert_eq!(acc["reason"], "NoMatchingParent");

    // Gateway API's per-parent status.
    let parents = web["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1, "{web}");
    assert_eq!(parents[0]["parentRef"]["name"], "gw");
    assert_eq!(parents[0]["parentRef"]["namespace"], "default");
    assert_eq!(parents[0]["parentRef"]["kind"], "Gateway");
    assert_eq!(
        parents[0]["controllerName"],
        "biplane.dev/gateway-controller"
    );
    let types: Vec<_> = parents[0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        types,
        [
            ("Accepted", "True"),
            ("ResolvedRefs", "True"),
            ("Programmed", "False")
        ]
    );
    let orphan_parent = &orphan["status"]["parents"][0];
    assert_eq!(orphan_parent["parentRef"]["name"], "nogw");
    assert_eq!(orphan_parent["conditions"][0]["status"], "False");
    assert!(
        orphan_parent["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nogw"),
        "{orphan_parent}"
    );

    let (_, gw) = cp.get("/api/v1/gateways/default/gw").await;
    assert_eq!(condition(&gw, "Accepted")["status"], "True");
    assert_eq!(condition(&gw, "Programmed")["status"], "False");
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_every_resource() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&docs(&[
        &base_docs(),
        &backend("b2", 9002),
        &secret_doc(FAKE_KEY),
    ]))
    .await;
    cp.apply_ok(&route("web", "echo", "/v2")).await;
    cp.delete("/api/v1/backends/default/b2").await;
    let revision = cp.revision().await;
    let mut before = Vec::new();
    for kind in ["gateways", "httproutes", "backends", "secrets"] {
        before.push(cp.get(&format!("/api/v1/{kind}?showSecrets=true")).await.1["items"].clone());
    }
    cp.handle.shutdown().await;

    let cp = start_in(dir.path()).await;
    assert_eq!(cp.revision().await, revision);
    for (i, kind) in ["gateways", "httproutes", "backends", "secrets"]
        .iter()
        .enumerate()
    {
        let items = cp.get(&format!("/api/v1/{kind}?showSecrets=true")).await.1["items"].clone();
        // Status is computed on read (and the fleet differs); compare the stored parts.
        let strip = |v: &Value| -> Vec<Value> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    let mut d = d.clone();
                    d.as_object_mut().unwrap().remove("status");
                    d
                })
                .collect()
        };
        assert_eq!(strip(&items), strip(&before[i]), "{kind}");
    }
    let again = cp.apply_ok(&route("web", "echo", "/v2")).await;
    assert_eq!(actions(&again), vec![("web".into(), "unchanged".into())]);
    let (status, _) = cp.get("/healthz").await;
    assert_eq!(status, 200);
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn concurrent_applies_do_not_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&docs(&[GATEWAY, &backend("echo", 9001)])).await;
    // Eight clients each apply two routes in one request; every request succeeds, and
    // each pair lands at one revision.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let http = cp.http.clone();
        let url = cp.url("/api/v1/apply");
        let body = docs(&[
            &route(&format!("a{i}"), "echo", &format!("/a{i}")),
            &route(&format!("b{i}"), "echo", &format!("/b{i}")),
        ]);
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).body(body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }));
    }
    let mut revisions = Vec::new();
    for t in tasks {
        let body = t.await.unwrap();
        let rvs: Vec<&Value> = body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["resourceVersion"])
            .collect();
        assert_eq!(rvs[0], rvs[1], "{body:#}");
        revisions.push(body["revision"].as_u64().unwrap());
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 8, "each apply is its own revision");
    let (_, list) = cp.get("/api/v1/httproutes").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 16);
    cp.handle.shutdown().await;
}
