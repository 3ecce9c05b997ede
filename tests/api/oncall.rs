//! On-call gates, black-box: the real relay on port 0 against a fake P0 and fake PagerDuty,
//! Opsgenie and GitHub APIs. The fakes answer with the example bodies of the providers' API
//! descriptions (deploy/contracts/), and every call the relay makes to them is checked against
//! those descriptions. An approve reaches P0 only once the provider says its actor was on call
//! (or in the team) within the scope the operator pinned; a refusal is answered back in words
//! that name no policy, schedule or team; a check that cannot be made is retried, and
//! dead-lettered past the decision's max age.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::bindings::pd_note;
use crate::common::pg::TestDb;
use crate::common::*;
use crate::common::{
    GH_TOKEN, OG_KEY, PD_TOKEN, Providers, answer_vars, body, check_contract, check_response,
    header, spec,
};
use serde_json::{Value, json};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

/// The agent of the PagerDuty samples, the escalation policy the acknowledged sample names,
/// and the incident both are on.
const USER: &str = "PLH1HKV";
const POLICY: &str = "PUS0KTE";
const INCIDENT: &str = "PGR0VU2";
const SCHEDULE: &str = "PI7DH85";
/// The Opsgenie user of the samples: the ID their `userId` carries, and the name.
const OG_USER: &str = OG_APPROVER;
const OG_NAME: &str = "jane.doe@acme.example";
/// PagerDuty on `PAGERDUTY_ONCALL=on`, its check pinned to the samples' escalation policy.
const PD_GATE: [(&str, &str); 2] = [
    ("PAGERDUTY_ONCALL", "on"),
    ("PAGERDUTY_ONCALL_ESCALATION_POLICIES", POLICY),
];

/// One PagerDuty on-call as the fake lists it.
struct PdOnCall {
    user: String,
    policy: String,
    level: u64,
    schedule: String,
    /// RFC 3339 start and end.
    span: (String, String),
}

/// What the fake providers say: who is on call, and whether they answer at all.
#[derive(Default)]
struct Truth {
    /// PagerDuty on-calls, in the order the fake pages through them.
    pagerduty: Mutex<Vec<PdOnCall>>,
    /// Opsgenie schedule name -> its on-call participants' (user ID, name).
    opsgenie: Mutex<HashMap<String, Vec<(String, String)>>>,
    /// GitHub `org/team` -> login -> membership state.
    github: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Not zero: every provider GET answers this status (503: the provider is down).
    down: AtomicU16,
    /// How many `/oncalls` pages PagerDuty was asked for.
    pages: AtomicUsize,
}

/// The span of an on-call running now: from six hours ago to six hours ahead.
fn around_now() -> (String, String) {
    let now = SystemTime::now();
    let six = Duration::from_secs(6 * 3600);
    (rfc3339(now - six), rfc3339(now + six))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Truth {
    fn pd_on_call(&self, user: &str, level: u64) {
        self.pd_on_call_for(user, POLICY, level);
    }

    fn pd_on_call_for(&self, user: &str, policy: &str, level: u64) {
        self.pagerduty.lock().unwrap().push(PdOnCall {
            user: user.into(),
            policy: policy.into(),
            level,
            schedule: SCHEDULE.into(),
            span: around_now(),
        });
    }

    fn og_on_call(&self, schedule: &str, people: &[(&str, &str)]) {
        self.opsgenie.lock().unwrap().insert(
            schedule.into(),
            people
                .iter()
                .map(|(id, name)| (id.to_string(), name.to_string()))
                .collect(),
        );
    }

    fn down(&self) -> Option<ResponseTemplate> {
        match self.down.load(Ordering::SeqCst) {
            0 => None,
            s => Some(ResponseTemplate::new(s).insert_header("Retry-After", "0")),
        }
    }
}

/// An example body of a contract's 200 answer.
fn example(spec_file: &str, template: &str) -> Value {
    let spec = spec(spec_file);
    let content =
        &spec["paths"][template]["get"]["responses"]["200"]["content"]["application/json"];
    if let Some(v) = content["example"].as_object() {
        return Value::Object(v.clone());
    }
    let examples = content["examples"].as_object().unwrap();
    let first = examples.values().next().unwrap();
    match first["$ref"].as_str() {
        Some(r) => spec
            .pointer(&format!("{}/value", r.trim_start_matches('#')))
            .unwrap()
            .clone(),
        None => first["value"].clone(),
    }
}

/// Drops the `null`s of an example: PagerDuty's own incident example has `resolved_at`,
/// `resolve_reason` and `alert_grouping.ended_at` null, which its schema does not mark
/// nullable; the relay reads none of them.
fn without_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(without_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(without_nulls),
        _ => {}
    }
}

fn pd_incident(id: &str) -> Value {
    let mut v = example("pagerduty-oncall.json", "/incidents/{id}");
    without_nulls(&mut v);
    v["incident"]["id"] = id.into();
    v["incident"]["escalation_policy"]["id"] = POLICY.into();
    v
}

fn pd_oncalls(truth: &Truth, req: &Request) -> Value {
    truth.pages.fetch_add(1, Ordering::SeqCst);
    let q: Vec<(String, String)> = req.url.query_pairs().into_owned().collect();
    let all = |k: &str| -> Vec<String> {
        q.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let one = |k: &str, default: usize| {
        all(k)
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (users, policies, schedules) = (
        all("user_ids[]"),
        all("escalation_policy_ids[]"),
        all("schedule_ids[]"),
    );
    let (limit, offset) = (one("limit", 25).min(100), one("offset", 0));
    // Only on-calls that overlap the window asked about, as PagerDuty answers.
    let time = |k: &str| {
        all(k)
            .first()
            .and_then(|v| humantime::parse_rfc3339_weak(v.trim_end_matches('Z')).ok())
    };
    let (since, until) = (time("since"), time("until"));
    let overlaps = |span: &(String, String)| {
        let at = |t: &str| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok();
        let (start, end) = (at(&span.0), at(&span.1));
        since.zip(end).is_none_or(|(s, e)| e > s) && until.zip(start).is_none_or(|(u, s)| s < u)
    };
    let template = example("pagerduty-oncall.json", "/oncalls")["oncalls"][0].clone();
    let matching: Vec<Value> = truth
        .pagerduty
        .lock()
        .unwrap()
        .iter()
        .filter(|o| {
            (users.is_empty() || users.contains(&o.user))
                && (policies.is_empty() || policies.contains(&o.policy))
                && (schedules.is_empty() || schedules.contains(&o.schedule))
                && overlaps(&o.span)
        })
        .map(|o| {
            let mut v = template.clone();
            v["user"]["id"] = o.user.as_str().into();
            v["escalation_policy"]["id"] = o.policy.as_str().into();
            v["schedule"]["id"] = o.schedule.as_str().into();
            v["escalation_level"] = o.level.into();
            v["start"] = o.span.0.as_str().into();
            v["end"] = o.span.1.as_str().into();
            v
        })
        .collect();
    let page: Vec<Value> = matching.iter().skip(offset).take(limit).cloned().collect();
    let more = offset + page.len() < matching.len();
    json!({ "oncalls": page, "limit": limit, "offset": offset, "more": more })
}

fn og_oncalls(truth: &Truth, schedule: &str) -> Option<Value> {
    let people = truth.opsgenie.lock().unwrap().get(schedule).cloned()?;
    let mut v = example(
        "opsgenie-oncall.json",
        "/v2/schedules/{identifier}/on-calls",
    );
    v["data"]["_parent"]["name"] = schedule.into();
    // Not flat: the participants with their IDs, users nested in an escalation as Opsgenie
    // nests them.
    v["data"]
        .as_object_mut()
        .unwrap()
        .remove("onCallRecipients");
    let users: Vec<Value> = people
        .iter()
        .map(|(id, name)| json!({ "id": id, "name": name, "type": "user" }))
        .collect();
    v["data"]["onCallParticipants"] = json!([
        { "id": "e-1", "name": "Orders escalation", "type": "escalation", "onCallParticipants": users }
    ]);
    Some(v)
}

fn gh_membership(truth: &Truth, org: &str, team: &str, user: &str) -> Option<Value> {
    let state = truth
        .github
        .lock()
        .unwrap()
        .get(&format!("{org}/{team}"))?
        .get(user)?
        .clone();
    let mut v = example(
        "github-teams.json",
        "/orgs/{org}/teams/{team_slug}/memberships/{username}",
    );
    v["state"] = state.into();
    v["url"] = format!("https://api.github.com/teams/1/memberships/{user}").into();
    Some(v)
}

fn segment(req: &Request, i: usize) -> String {
    let raw = req.url.path_segments().unwrap().nth(i).unwrap_or("");
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// The answer-back fakes of `Providers`, with the on-call APIs mounted beside them.
async fn fakes() -> (Providers, Arc<Truth>) {
    let providers = Providers::start().await;
    let truth = Arc::new(Truth::default());
    let t = truth.clone();
    Mock::given(method("GET"))
        .and(path_regex(r"^/incidents/[^/]+$"))
        .respond_with(move |req: &Request| {
            t.down().unwrap_or_else(|| {
                ResponseTemplate::new(200).set_body_json(pd_incident(&segment(req, 1)))
            })
        })
        .mount(&providers.pagerduty)
        .await;
    let t = truth.clone();
    Mock::given(method("GET"))
        .and(path_regex(r"^/oncalls$"))
        .respond_with(move |req: &Request| {
            t.down()
                .unwrap_or_else(|| ResponseTemplate::new(200).set_body_json(pd_oncalls(&t, req)))
        })
        .mount(&providers.pagerduty)
        .await;
    let t = truth.clone();
    Mock::given(method("GET"))
        .and(path_regex(r"^/v2/schedules/[^/]+/on-calls$"))
        .respond_with(move |req: &Request| {
            t.down()
                .unwrap_or_else(|| match og_oncalls(&t, &segment(req, 2)) {
                    Some(v) => ResponseTemplate::new(200).set_body_json(v),
                    None => ResponseTemplate::new(404).set_body_json(json!({
                        "message": "Schedule not found", "took": 0.001, "requestId": "r-404"
                    })),
                })
        })
        .mount(&providers.opsgenie)
        .await;
    let t = truth.clone();
    Mock::given(method("GET"))
        .and(path_regex(r"^/orgs/[^/]+/teams/[^/]+/memberships/[^/]+$"))
        .respond_with(move |req: &Request| {
            t.down().unwrap_or_else(|| {
                match gh_membership(&t, &segment(req, 1), &segment(req, 3), &segment(req, 5)) {
                    Some(v) => ResponseTemplate::new(200).set_body_json(v),
                    None => ResponseTemplate::new(404).set_body_json(json!({
                        "message": "Not Found",
                        "documentation_url": "https://docs.github.com/rest/teams/members#get-team-membership-for-a-user"
                    })),
                }
            })
        })
        .mount(&providers.github)
        .await;
    (providers, truth)
}

/// A relay answering back through `providers`, with `vars` turning checks on, on SQLite or
/// (with `db`) on PostgreSQL. Returns it with the `--db` argument its store is read by.
async fn gated(
    providers: &Providers,
    vars: &[(&'static str, &str)],
    db: Option<&TestDb>,
    p0_extra: &str,
) -> (TestRelay, String) {
    let mut all = answer_vars();
    all.extend(vars.iter().map(|(k, v)| (*k, v.to_string())));
    let t = spawn_with(Setup {
        vars: all,
        top: providers.yaml(),
        store_url: db.map(|d| d.url()),
        p0_extra: p0_extra.into(),
        ..Setup::default()
    })
    .await;
    let store = match db {
        Some(d) => d.url(),
        None => t.dir.path().join("relay.db").display().to_string(),
    };
    (t, store)
}

/// `jobs show` of `job`, once its first line names `state` (polling the CLI, up to 10 s).
async fn show_when(store: &str, job: i64, state: &str) -> String {
    let id = job.to_string();
    let mut out = String::new();
    for _ in 0..200 {
        let (code, text) = run_cli(&["jobs", "show", &id, "--db", store], &test_env(&[]));
        out = text;
        if code == Some(0)
            && out
                .lines()
                .next()
                .is_some_and(|l| l.ends_with(&format!("({state})")))
        {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job} never reached {state}:\n{out}");
}

/// The GETs `server` received (the on-call checks), in order.
async fn gets(server: &MockServer) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.method.as_str() == "GET")
        .collect()
}

/// The POSTs `server` received (the answers back), once there are `n` and the relay has
/// handled all it took.
async fn posts(t: &TestRelay, server: &MockServer, n: usize) -> Vec<Request> {
    let all = t.store.received(server, n).await;
    let posts: Vec<Request> = all
        .into_iter()
        .filter(|r| r.method.as_str() == "POST")
        .collect();
    assert_eq!(posts.len(), n, "answers back: {:?}", summarize(&posts));
    posts
}

/// Every call in `calls` is one the description in `spec_file` allows.
fn conform(spec_file: &str, calls: &[Request]) {
    let spec = spec(spec_file);
    assert!(!calls.is_empty(), "{spec_file}: no calls");
    for c in calls {
        if let Err(e) = check_contract(&spec, c) {
            panic!("{spec_file}: {} {}: {e}", c.method, c.url);
        }
    }
}

fn query(req: &Request) -> Vec<(String, String)> {
    req.url.query_pairs().into_owned().collect()
}

fn job_id(ans: &Value) -> i64 {
    ans["decisions"][0]["job_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no job in {ans}"))
}

async fn wait_metric_at_least(t: &TestRelay, series: &str, at_least: f64) {
    for _ in 0..200 {
        if t.metric(series).await.is_some_and(|v| v >= at_least) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{series}: never reached {at_least}");
}

/// The acknowledged sample (its event names the escalation policy), as event `event_id`,
/// occurring now.
fn pd_ack(event_id: &str) -> Hook {
    let mut v: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    v["event"]["id"] = event_id.into();
    Hook::pagerduty(&format!("wh-{event_id}"), &serde_json::to_vec(&v).unwrap())
}

/// The event time a PagerDuty hook carries, as the relay writes it (to the second), and the
/// ten-minute window of on-calls it asks PagerDuty about.
fn occurred(hook: &Hook) -> (String, String, String) {
    let v: Value = serde_json::from_slice(&hook.body).unwrap();
    let text = v["event"]["occurred_at"].as_str().unwrap();
    let at = humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).unwrap();
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let from = SystemTime::UNIX_EPOCH + Duration::from_secs(secs / 600 * 600);
    (
        rfc3339(at),
        rfc3339(from),
        rfc3339(from + Duration::from_secs(600)),
    )
}

// --- The fakes themselves answer as the descriptions say ---

#[test]
fn the_fakes_answer_in_the_described_shapes() {
    let truth = Truth::default();
    truth.pd_on_call(USER, 1);
    truth.og_on_call("Orders on-call", &[(OG_USER, OG_NAME)]);
    truth.github.lock().unwrap().insert(
        "acme/sre".into(),
        HashMap::from([("octocat".to_owned(), "active".to_owned())]),
    );
    let req = Request {
        url: "http://x/oncalls?user_ids%5B%5D=PLH1HKV&escalation_policy_ids%5B%5D=PUS0KTE"
            .parse()
            .unwrap(),
        method: wiremock::http::Method::GET,
        headers: Default::default(),
        body: Vec::new(),
    };
    let pd = spec("pagerduty-oncall.json");
    let oncalls = pd_oncalls(&truth, &req);
    assert_eq!(oncalls["oncalls"].as_array().unwrap().len(), 1);
    check_response(&pd, "/oncalls", "get", 200, &oncalls);
    check_response(&pd, "/incidents/{id}", "get", 200, &pd_incident(INCIDENT));
    check_response(
        &spec("opsgenie-oncall.json"),
        "/v2/schedules/{identifier}/on-calls",
        "get",
        200,
        &og_oncalls(&truth, "Orders on-call").unwrap(),
    );
    check_response(
        &spec("github-teams.json"),
        "/orgs/{org}/teams/{team_slug}/memberships/{username}",
        "get",
        200,
        &gh_membership(&truth, "acme", "sre", "octocat").unwrap(),
    );
}

#[test]
fn the_contract_check_refuses_an_undescribed_on_call_query() {
    let pd = spec("pagerduty-oncall.json");
    let mut req = Request {
        url: "http://x/oncalls?user_ids%5B%5D=P1&since=2026-11-27T10:20:00Z&offset=100"
            .parse()
            .unwrap(),
        method: wiremock::http::Method::GET,
        headers: Default::default(),
        body: Vec::new(),
    };
    for (k, v) in [
        ("authorization", "Token token=t"),
        ("accept", "application/vnd.pagerduty+json;version=2"),
        ("content-type", "application/json"),
    ] {
        req.headers.insert(k, v.parse().unwrap());
    }
    check_contract(&pd, &req).unwrap();
    req.url = "http://x/oncalls?user_id=P1".parse().unwrap();
    assert!(
        check_contract(&pd, &req)
            .unwrap_err()
            .contains("not described")
    );
    req.url = "http://x/oncalls?since=yesterday".parse().unwrap();
    assert!(check_contract(&pd, &req).unwrap_err().contains("date-time"));
    req.url = "http://x/oncalls".parse().unwrap();
    req.headers.remove("content-type");
    assert!(
        check_contract(&pd, &req)
            .unwrap_err()
            .contains("Content-Type")
    );
}

// --- PagerDuty ---

/// On call: the acknowledgement's escalation policy (one the operator pinned) is asked about
/// at the event's signed time, the approve is sent once, and `jobs show` names the check and
/// what PagerDuty said.
async fn an_on_call_acknowledgement_approves(db: Option<&TestDb>) {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    let (t, store) = gated(&providers, &PD_GATE, db, "").await;
    t.p0_ok().await;
    let ack = pd_ack("01ONCALLACK1");
    let (at, since, until) = occurred(&ack);
    let (status, ans) = t.post(&ack).await;
    assert_eq!(status, 202, "{ans}");
    let job = job_id(&ans);
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        vec![call(
            "approve",
            "req-789",
            json!({"expirationLength": "1h"})
        )]
    );
    let checks = gets(&providers.pagerduty).await;
    assert_eq!(
        checks.len(),
        1,
        "the event names its policy: no incident fetch"
    );
    assert_eq!(checks[0].url.path(), "/oncalls");
    assert_eq!(
        query(&checks[0]),
        [
            ("user_ids[]", USER),
            ("escalation_policy_ids[]", POLICY),
            ("since", since.as_str()),
            ("until", until.as_str()),
            ("limit", "100"),
            ("offset", "0"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    assert_eq!(
        header(&checks[0], "authorization"),
        format!("Token token={PD_TOKEN}")
    );
    conform("pagerduty-oncall.json", &checks);
    let out = show_when(&store, job, "succeeded").await;
    assert!(
        out.contains(&format!(
            "  on call:    checked before P0 is called: PagerDuty: {USER} on call for escalation policy {POLICY} (one of {POLICY}) at level 1 or lower, as of {at}"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  evidence:   on call: escalation policy {POLICY} level 1 (schedule {SCHEDULE}), "
        )) && out.contains(&format!("(PagerDuty, for {USER} at {at}); checked 20")),
        "{out}"
    );
    let notes = posts(&t, &providers.pagerduty, 1).await;
    assert_eq!(
        body(&notes[0]),
        json!({"note": {"content": "p0-relay: P0 approved request req-789; access expires in 1h."}})
    );
    t.wait_metric(
        "p0_relay_oncall_checks_total{provider=\"pagerduty\",result=\"on_call\"}",
        1.0,
    )
    .await;
    assert!(
        t.metric("p0_relay_oncall_check_duration_seconds_count{provider=\"pagerduty\"}")
            .await
            == Some(1.0)
    );
    assert_eq!(t.settle().await.len(), 1, "exactly one P0 call");
}

/// A gated approve's life in the audit trail, as `p0-relay audit --json` prints it: accepted,
/// checked (with the evidence), sent, answered; its incident's end revokes it (revoked, sent,
/// answered). Each event says what it is about.
async fn an_approves_life_is_in_the_audit_trail(db: Option<&TestDb>) {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    let (t, store) = gated(&providers, &PD_GATE, db, "").await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_ack("01AUDITACK")).await;
    assert_eq!(status, 202, "{ans}");
    posts(&t, &providers.pagerduty, 1).await;
    let (status, ans) = t
        .post(&crate::bindings::pd_resolved("01AUDITEND", INCIDENT))
        .await;
    assert_eq!(status, 202, "{ans}");
    posts(&t, &providers.pagerduty, 2).await;
    let (code, out) = run_cli(&["audit", "--json", "--db", &store], &test_env(&[]));
    assert_eq!(code, Some(0), "{out}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let steps: Vec<(String, String, String, i64)> = events
        .iter()
        .map(|e| {
            let job = e["job_id"].as_i64().unwrap_or_default();
            (s(&e["event"]), s(&e["outcome"]), s(&e["action"]), job)
        })
        .collect();
    let step = |e: &str, o: &str, a: &str, j: i64| (e.into(), o.into(), a.into(), j);
    assert_eq!(
        steps,
        [
            step("accepted", "queued", "approve", 1),
            step("checked", "on_call", "approve", 1),
            step("sent", "success", "approve", 1),
            step("answered", "sent", "approve", 1),
            step("revoked", "queued", "revoke", 2),
            step("sent", "success", "revoke", 2),
            step("answered", "sent", "revoke", 2),
        ]
    );
    let ids: Vec<i64> = events.iter().filter_map(|e| e["id"].as_i64()).collect();
    assert_eq!(ids, (1..=7).collect::<Vec<_>>());
    for e in &events {
        for (field, want) in [
            ("source", "pagerduty"),
            ("org", "acme"),
            ("request_id", "req-789"),
            ("subject", INCIDENT),
        ] {
            assert_eq!(e[field], want, "{field}: {e}");
        }
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
    }
    assert_eq!(
        (events[0]["rule"].as_str(), events[0]["actor"].as_str()),
        (Some("incident-acknowledged"), Some(USER))
    );
    assert!(
        events[1]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with(&format!("on call: escalation policy {POLICY}"))),
        "{}",
        events[1]
    );
    assert_eq!(events[2]["status"], 200);
    assert_eq!(events[4]["reason"], "its subject ended");
}

#[tokio::test]
async fn an_approves_life_is_in_the_audit_trail_on_sqlite() {
    an_approves_life_is_in_the_audit_trail(None).await;
}

#[tokio::test]
async fn an_approves_life_is_in_the_audit_trail_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    an_approves_life_is_in_the_audit_trail(Some(&db)).await;
}

#[tokio::test]
async fn pagerduty_an_on_call_acknowledgement_approves_with_its_evidence() {
    an_on_call_acknowledgement_approves(None).await;
}

#[tokio::test]
async fn pagerduty_an_on_call_acknowledgement_approves_with_its_evidence_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    an_on_call_acknowledgement_approves(Some(&db)).await;
}

/// Not on call: a note's incident is fetched for its policy, PagerDuty says the author is
/// not on call for it, P0 is never asked, and the refusal is answered on the incident without
/// naming the policy (which `jobs show` keeps).
async fn a_note_by_someone_not_on_call_is_refused(db: Option<&TestDb>) {
    let (providers, truth) = fakes().await;
    truth.pd_on_call("PXOTHER", 1);
    let (t, store) = gated(&providers, &PD_GATE, db, "").await;
    t.p0_ok().await;
    let note = pd_note("01ONCALLNOTE1", INCIDENT, "/p0 approve req-321 30m");
    let (at, _, _) = occurred(&note);
    let (status, ans) = t.post(&note).await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (202, Some("accepted")),
        "{ans}"
    );
    let job = job_id(&ans);
    let out = show_when(&store, job, "rejected").await;
    let why = format!("not on call: {USER} at {at} is not on call for escalation policy {POLICY}");
    assert!(
        out.contains(&format!("  evidence:   {why}; checked 20")),
        "{out}"
    );
    assert!(out.contains("not_on_call"), "{out}");
    let checks = gets(&providers.pagerduty).await;
    assert_eq!(
        checks.iter().map(|r| r.url.path()).collect::<Vec<_>>(),
        [format!("/incidents/{INCIDENT}"), "/oncalls".into()]
    );
    conform("pagerduty-oncall.json", &checks);
    let notes = posts(&t, &providers.pagerduty, 1).await;
    assert_eq!(notes[0].url.path(), format!("/incidents/{INCIDENT}/notes"));
    assert_eq!(
        body(&notes[0]),
        json!({"note": {"content": "p0-relay: refused to approve request req-321, and did not ask P0: not on call for this incident."}}),
        "in public, the refusal names no policy or schedule"
    );
    t.wait_metric(
        "p0_relay_oncall_checks_total{provider=\"pagerduty\",result=\"not_on_call\"}",
        1.0,
    )
    .await;
    assert!(t.settle().await.is_empty(), "P0 is never asked");
}

#[tokio::test]
async fn pagerduty_a_note_by_someone_not_on_call_is_refused_and_answered() {
    a_note_by_someone_not_on_call_is_refused(None).await;
}

#[tokio::test]
async fn pagerduty_a_note_by_someone_not_on_call_is_refused_and_answered_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    a_note_by_someone_not_on_call_is_refused(Some(&db)).await;
}

/// The operator pins the policies that count: an incident moved onto another policy, one its
/// acknowledger is on call for, is refused whatever PagerDuty says of that policy.
#[tokio::test]
async fn pagerduty_an_acknowledgement_on_a_policy_not_pinned_is_refused_though_on_call() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call_for(USER, "PLOWSTAKES", 1);
    let (t, store) = gated(&providers, &PD_GATE, None, "").await;
    t.p0_ok().await;
    let mut v: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    v["event"]["id"] = "01MOVEDPOLICY".into();
    v["event"]["data"]["escalation_policy"]["id"] = "PLOWSTAKES".into();
    let (status, ans) = t
        .post(&Hook::pagerduty(
            "wh-moved",
            &serde_json::to_vec(&v).unwrap(),
        ))
        .await;
    assert_eq!(status, 202, "{ans}");
    let out = show_when(&store, job_id(&ans), "rejected").await;
    assert!(
        out.contains(&format!(
            "  evidence:   not on call: escalation policy PLOWSTAKES of the incident is not one the check trusts ({POLICY})"
        )),
        "{out}"
    );
    assert!(
        gets(&providers.pagerduty).await.is_empty(),
        "refused before PagerDuty is asked"
    );
    let notes = posts(&t, &providers.pagerduty, 1).await;
    assert!(
        !String::from_utf8_lossy(&notes[0].body).contains("PLOWSTAKES"),
        "{:?}",
        body(&notes[0])
    );
    assert!(t.settle().await.is_empty(), "P0 is never asked");
}

/// An automated acknowledgement names no agent: under a gate it is refused as it arrives, and
/// nothing is stored or asked.
#[tokio::test]
async fn pagerduty_an_acknowledgement_with_no_agent_is_refused_under_a_gate() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    let mut vars = PD_GATE.to_vec();
    vars.push(("PAGERDUTY_APPROVERS", "*"));
    let (t, _) = gated(&providers, &vars, None, "").await;
    t.p0_ok().await;
    let mut v: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    v["event"]["id"] = "01AUTOACK".into();
    v["event"]["agent"] = Value::Null;
    let (status, ans) = t
        .post(&Hook::pagerduty(
            "wh-auto",
            &serde_json::to_vec(&v).unwrap(),
        ))
        .await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (200, Some("rejected")),
        "{ans}"
    );
    assert!(
        ans["reason"].as_str().unwrap().starts_with("no actor: "),
        "{ans}"
    );
    assert!(ans.get("job_ids").is_none(), "nothing stored: {ans}");
    // A sentinel the relay does send proves the refusal made no call before it.
    let (status, ans) = t.post(&pd_ack("01AFTERAUTO")).await;
    assert_eq!(status, 202, "{ans}");
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls)[0].0,
        format!("/o/{ORG}/permission-requests/req-789/approve")
    );
    assert_eq!(t.settle().await.len(), 1);
    assert_eq!(
        gets(&providers.pagerduty).await.len(),
        1,
        "only the sentinel was checked"
    );
}

/// PagerDuty pages its on-calls: an on-call on the second page counts.
#[tokio::test]
async fn pagerduty_an_on_call_on_the_second_page_counts() {
    let (providers, truth) = fakes().await;
    {
        // A hundred on-calls of the same user and policy come first, each a handover of a
        // few seconds in the ten minutes asked about, all over before the event.
        let mut list = truth.pagerduty.lock().unwrap();
        let now = SystemTime::now();
        let window = now
            - Duration::from_secs(
                now.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    % 600,
            );
        for i in 1..=100u64 {
            let start = humantime::format_rfc3339_millis(window + Duration::from_millis(i));
            list.push(PdOnCall {
                user: USER.into(),
                policy: POLICY.into(),
                level: 1,
                schedule: SCHEDULE.into(),
                span: (start.to_string(), start.to_string()),
            });
        }
    }
    truth.pd_on_call(USER, 1);
    let (t, store) = gated(&providers, &PD_GATE, None, "").await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_ack("01SECONDPAGE")).await;
    assert_eq!(status, 202, "{ans}");
    t.wait_for_calls(1).await;
    show_when(&store, job_id(&ans), "succeeded").await;
    let checks = gets(&providers.pagerduty).await;
    let offsets: Vec<String> = checks
        .iter()
        .map(|c| {
            query(c)
                .into_iter()
                .find(|(k, _)| k == "offset")
                .map(|(_, v)| v)
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(offsets, ["0", "100"]);
    conform("pagerduty-oncall.json", &checks);
}

#[tokio::test]
async fn pagerduty_on_call_above_the_highest_level_allowed_is_refused() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 2);
    // Without PAGERDUTY_ONCALL_MAX_LEVEL, only level 1 counts.
    let (t, store) = gated(&providers, &PD_GATE, None, "").await;
    t.p0_ok().await;
    let ack = pd_ack("01ONCALLLVL2");
    let (at, _, _) = occurred(&ack);
    let (status, ans) = t.post(&ack).await;
    assert_eq!(status, 202, "{ans}");
    let out = show_when(&store, job_id(&ans), "rejected").await;
    assert!(
        out.contains(&format!(
            "  evidence:   not on call at level 1 or lower: {USER} at {at} is on call for escalation policy {POLICY} only at level 2"
        )),
        "{out}"
    );
    let notes = posts(&t, &providers.pagerduty, 1).await;
    assert!(
        body(&notes[0])["note"]["content"]
            .as_str()
            .unwrap()
            .ends_with("did not ask P0: not on call for this incident."),
    );
    assert!(t.settle().await.is_empty(), "P0 is never asked");
}

#[tokio::test]
async fn pagerduty_down_then_back_approves_once() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    truth.down.store(503, Ordering::SeqCst);
    let (t, store) = gated(&providers, &PD_GATE, None, "").await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_ack("01ONCALLDOWN1")).await;
    assert_eq!(status, 202, "accepted while the provider is down: {ans}");
    let job = job_id(&ans);
    let failed = "p0_relay_oncall_checks_total{provider=\"pagerduty\",result=\"failed\"}";
    wait_metric_at_least(&t, failed, 3.0).await;
    assert!(t.p0_calls().await.is_empty(), "never approved on doubt");
    let out = show_when(&store, job, "pending").await;
    assert!(out.contains("check_failed"), "{out}");
    assert!(out.contains("on-call check: pagerduty: "), "{out}");
    assert!(out.contains("  evidence:   (not checked yet)"), "{out}");

    truth.down.store(0, Ordering::SeqCst);
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        vec![call(
            "approve",
            "req-789",
            json!({"expirationLength": "1h"})
        )]
    );
    let out = show_when(&store, job, "succeeded").await;
    assert!(out.contains("  evidence:   on call: "), "{out}");
    conform("pagerduty-oncall.json", &gets(&providers.pagerduty).await);
    assert_eq!(
        posts(&t, &providers.pagerduty, 1).await.len(),
        1,
        "answered once"
    );
    assert_eq!(t.settle().await.len(), 1, "approved once");
}

#[tokio::test]
async fn pagerduty_down_past_the_max_age_dead_letters_and_answers() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    truth.down.store(503, Ordering::SeqCst);
    let (t, store) = gated(&providers, &PD_GATE, None, "    max_age: 1s\n").await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_ack("01ONCALLDEAD1")).await;
    assert_eq!(status, 202, "{ans}");
    let out = show_when(&store, job_id(&ans), "dead").await;
    assert!(out.contains("on-call check: pagerduty: "), "{out}");
    let notes = posts(&t, &providers.pagerduty, 1).await;
    assert_eq!(
        body(&notes[0]),
        json!({"note": {"content": "p0-relay: refused to approve request req-789, and did not ask P0: the on-call check could not be made within the decision's max age."}})
    );
    // Back now, too late: the decision stays dead and P0 is never asked.
    truth.down.store(0, Ordering::SeqCst);
    assert!(t.settle().await.is_empty(), "never approved on doubt");
}

/// A check that passed holds for `answers.oncall_recheck_after`: an approve P0 kept failing
/// past it is checked again before it is sent, as of now, and refused once its actor's shift
/// has ended, though they were on call when they acknowledged.
#[tokio::test]
async fn pagerduty_an_approve_not_sent_soon_after_its_check_is_checked_again() {
    let (providers, truth) = fakes().await;
    let providers_yaml = providers.yaml().replace(
        "  rate_per_second: 0\n",
        "  rate_per_second: 0\n  oncall_recheck_after: 1ms\n  oncall_cache: 1ms\n",
    );
    let mut vars = answer_vars();
    vars.extend(PD_GATE.iter().map(|(k, v)| (*k, v.to_string())));
    let t = spawn_with(Setup {
        vars,
        top: providers_yaml,
        ..Setup::default()
    })
    .await;
    let store = t.dir.path().join("relay.db").display().to_string();
    // P0 fails the first call, after 1.5 s; by the retry, the check is older than it may be.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(1500)))
        .up_to_n_times(1)
        .mount(&t.p0)
        .await;
    t.p0_ok().await;
    let ack = pd_ack("01RECHECK1");
    let (at, _, _) = occurred(&ack);
    // On call from six hours ago until half a second after the acknowledgement.
    let at_time = humantime::parse_rfc3339(&at).unwrap();
    truth.pagerduty.lock().unwrap().push(PdOnCall {
        user: USER.into(),
        policy: POLICY.into(),
        level: 1,
        schedule: SCHEDULE.into(),
        span: (
            rfc3339(at_time - Duration::from_secs(6 * 3600)),
            humantime::format_rfc3339_millis(at_time + Duration::from_millis(1500)).to_string(),
        ),
    });
    let (status, ans) = t.post(&ack).await;
    assert_eq!(status, 202, "{ans}");
    t.wait_for_calls(1).await;
    let out = show_when(&store, job_id(&ans), "rejected").await;
    assert!(out.contains("not_on_call"), "{out}");
    assert!(
        out.contains(&format!("is not on call for escalation policy {POLICY}"))
            && !out.contains(&format!("{USER} at {at} is not")),
        "checked again as of now, not as of the event: {out}"
    );
    assert_eq!(
        gets(&providers.pagerduty).await.len(),
        2,
        "checked before the first call and again before the retry"
    );
    assert_eq!(t.settle().await.len(), 1, "only the first, failed, call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_a_thousand_gated_decisions_asks_pagerduty_once() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    let (t, _) = gated(&providers, &PD_GATE, None, "").await;
    t.p0_ok().await;
    let t = Arc::new(t);
    let n = 1000;
    let mut sent = tokio::task::JoinSet::new();
    for chunk in 0..20 {
        let t = t.clone();
        sent.spawn(async move {
            for i in 0..n / 20 {
                let k = chunk * (n / 20) + i;
                let (status, ans) = t
                    .post(&pd_note(
                        &format!("01STORM{k:05}"),
                        INCIDENT,
                        &format!("/p0 approve req-s{k} 30m"),
                    ))
                    .await;
                assert_eq!(status, 202, "{ans}");
            }
        });
    }
    while let Some(r) = sent.join_next().await {
        r.unwrap();
    }
    for _ in 0..1200 {
        if t.p0_calls().await.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = t.p0_calls().await;
    assert_eq!(calls.len(), n, "every on-call decision is sent once");
    let checks = gets(&providers.pagerduty).await;
    let paths: Vec<&str> = checks.iter().map(|r| r.url.path()).collect();
    // The notes' event times may straddle a ten-minute window: at most one ask more.
    assert!(
        paths == [format!("/incidents/{INCIDENT}").as_str(), "/oncalls"]
            || paths
                == [
                    format!("/incidents/{INCIDENT}").as_str(),
                    "/oncalls",
                    "/oncalls"
                ],
        "one incident fetch and one on-call ask serve the whole storm: {paths:?}"
    );
    t.wait_metric(
        "p0_relay_oncall_checks_total{provider=\"pagerduty\",result=\"on_call\"}",
        n as f64,
    )
    .await;
}

// --- Opsgenie ---

/// The token holder writes the body, its `updatedAt` included: the check asks about the
/// moment the relay received the event, and matches the actor's user ID (not a name) with the
/// schedule's participants.
#[tokio::test]
async fn opsgenie_an_on_call_participant_approves_and_a_stranger_is_refused() {
    let (providers, truth) = fakes().await;
    truth.og_on_call("Orders on-call", &[(OG_USER, OG_NAME)]);
    let (t, store) = gated(
        &providers,
        &[
            ("OPSGENIE_APPROVERS", "*"),
            ("OPSGENIE_ONCALL", "on"),
            ("OPSGENIE_ONCALL_SCHEDULES", "Orders on-call"),
        ],
        None,
        "",
    )
    .await;
    t.p0_ok().await;
    // `updatedAt` says a year ago; the relay judges the moment it received the event.
    let ack = testdata("opsgenie/acknowledge.json");
    let before = SystemTime::now();
    let (status, ans) = t.post(&Hook::opsgenie(&ack)).await;
    let after = SystemTime::now();
    assert_eq!(status, 202, "{ans}");
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        vec![call(
            "approve",
            "req-654",
            json!({"expirationLength": "1h"})
        )]
    );
    let out = show_when(&store, job_id(&ans), "succeeded").await;
    assert!(
        out.contains("  evidence:   on call: schedule Orders on-call at 20")
            && out.contains(&format!("(Opsgenie, for user {OG_USER}); checked 20")),
        "{out}"
    );
    let checks = gets(&providers.opsgenie).await;
    assert_eq!(checks.len(), 1);
    assert_eq!(
        checks[0].url.path(),
        "/v2/schedules/Orders%20on-call/on-calls"
    );
    let q = query(&checks[0]);
    assert_eq!(
        q[..2],
        [("scheduleIdentifierType", "name"), ("flat", "false")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    let date = humantime::parse_rfc3339(&q[2].1).expect("a time to the millisecond");
    let second = Duration::from_millis(999);
    assert!(
        q[2].0 == "date" && date + second >= before && date <= after,
        "asked about the receipt, not updatedAt: {q:?}"
    );
    assert_eq!(
        header(&checks[0], "authorization"),
        format!("GenieKey {OG_KEY}")
    );
    conform("opsgenie-oncall.json", &checks);

    // Another alert, acknowledged by someone whose name is the on-call user's, but whose ID
    // is not.
    let mut v: Value = serde_json::from_slice(&ack).unwrap();
    v["alert"]["alertId"] = "b2c3d4e5-0000-47a8-9b0c-1d2e3f4a5b6c-1764238800999".into();
    v["alert"]["username"] = OG_NAME.into();
    v["alert"]["userId"] = "0badc0de-0000-4000-8000-000000000000".into();
    v["alert"]["details"]["p0_request_id"] = "req-655".into();
    let (status, ans) = t
        .post(&Hook::opsgenie(&serde_json::to_vec(&v).unwrap()))
        .await;
    assert_eq!(status, 202, "{ans}");
    let out = show_when(&store, job_id(&ans), "rejected").await;
    assert!(
        out.contains("  evidence:   not on call: user 0badc0de-0000-4000-8000-000000000000 is not an on-call participant of schedule Orders on-call at 20"),
        "{out}"
    );
    let notes = posts(&t, &providers.opsgenie, 2).await;
    let refusal = notes
        .iter()
        .find(|n| n.url.path().contains("b2c3d4e5"))
        .expect("the refusal is noted on its alert");
    assert_eq!(
        body(refusal)["note"],
        "p0-relay: refused to approve request req-655, and did not ask P0: not on call for this alert."
    );
    assert_eq!(
        t.settle().await.len(),
        1,
        "only the on-call approve is sent"
    );
}

// --- GitHub ---

#[tokio::test]
async fn github_an_active_team_member_approves_and_others_are_refused() {
    let (providers, truth) = fakes().await;
    truth.github.lock().unwrap().insert(
        "acme/sre".into(),
        HashMap::from([
            ("octocat".to_owned(), "active".to_owned()),
            ("hubot".to_owned(), "pending".to_owned()),
        ]),
    );
    let (t, store) = gated(
        &providers,
        &[
            ("GITHUB_APPROVERS", "*"),
            ("GITHUB_ONCALL", "on"),
            ("GITHUB_ONCALL_ORG", "acme"),
            ("GITHUB_ONCALL_TEAMS", "sre"),
        ],
        None,
        "",
    )
    .await;
    t.p0_ok().await;
    let mut jobs = Vec::new();
    for (n, login) in ["octocat", "hubot", "mallory"].iter().enumerate() {
        let body = github_comment_with_id(
            &format!("/p0 approve req-gh{n} 2h"),
            login,
            1_800_000 + n as u64,
        );
        let (status, ans) = t
            .post(&Hook::github(
                "issue_comment",
                &format!("gh-team-{n}"),
                &body,
                GITHUB_SECRET_NEW,
            ))
            .await;
        assert_eq!(status, 202, "{login}: {ans}");
        jobs.push(job_id(&ans));
    }
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        vec![call(
            "approve",
            "req-gh0",
            json!({"expirationLength": "2h"})
        )]
    );
    let out = show_when(&store, jobs[0], "succeeded").await;
    assert!(
        out.contains(
            "  evidence:   member: octocat is an active member of acme/sre (GitHub); checked 20"
        ),
        "{out}"
    );
    let out = show_when(&store, jobs[1], "rejected").await;
    assert!(
        out.contains("  evidence:   not a member: hubot is not an active member of acme/sre (acme/sre: membership pending)"),
        "{out}"
    );
    let out = show_when(&store, jobs[2], "rejected").await;
    assert!(
        out.contains("  evidence:   not a member: mallory is not an active member of acme/sre (acme/sre: not a member)"),
        "{out}"
    );
    let checks = gets(&providers.github).await;
    let mut asked: Vec<&str> = checks.iter().map(|r| r.url.path()).collect();
    asked.sort();
    assert_eq!(
        asked,
        [
            "/orgs/acme/teams/sre/memberships/hubot",
            "/orgs/acme/teams/sre/memberships/mallory",
            "/orgs/acme/teams/sre/memberships/octocat",
        ]
    );
    for c in &checks {
        assert_eq!(header(c, "authorization"), format!("Bearer {GH_TOKEN}"));
        assert_eq!(header(c, "accept"), "application/vnd.github+json");
    }
    conform("github-teams.json", &checks);
    // The approve gets its reaction; each refusal a reaction and a comment on the issue that
    // names no team.
    let answers = posts(&t, &providers.github, 5).await;
    let comments: Vec<String> = answers
        .iter()
        .filter(|r| r.url.path() == "/repos/acme/infra/issues/42/comments")
        .map(|r| body(r)["body"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(comments.len(), 2, "{comments:?}");
    for (comment, n) in comments.iter().zip([1, 2]) {
        assert_eq!(
            comment,
            &format!(
                "p0-relay: refused to approve request req-gh{n}, and did not ask P0: not an approver."
            )
        );
    }
    assert_eq!(t.settle().await.len(), 1);
}

/// The organization is pinned: a comment from a repository of another owner (a hook or App
/// covering several organizations) is refused as it arrives, whatever teams that owner has.
#[tokio::test]
async fn github_a_comment_from_a_repository_of_another_owner_is_refused() {
    let (providers, truth) = fakes().await;
    truth.github.lock().unwrap().insert(
        "evil-corp/sre".into(),
        HashMap::from([("octocat".to_owned(), "active".to_owned())]),
    );
    let (t, _) = gated(
        &providers,
        &[
            ("GITHUB_APPROVERS", "*"),
            ("GITHUB_ONCALL", "on"),
            ("GITHUB_ONCALL_ORG", "acme"),
            ("GITHUB_ONCALL_TEAMS", "sre"),
        ],
        None,
        "",
    )
    .await;
    t.p0_ok().await;
    let mut v: Value =
        serde_json::from_slice(&github_comment("/p0 approve req-x 2h", "octocat")).unwrap();
    v["repository"]["owner"]["login"] = "evil-corp".into();
    v["repository"]["full_name"] = "evil-corp/infra".into();
    let (status, ans) = t
        .post(&Hook::github(
            "issue_comment",
            "gh-other-owner",
            &serde_json::to_vec(&v).unwrap(),
            GITHUB_SECRET_NEW,
        ))
        .await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (200, Some("rejected")),
        "{ans}"
    );
    assert_eq!(
        ans["reason"],
        "oncall: the repository belongs to `evil-corp`, not to the organization whose teams this check asks"
    );
    assert!(gets(&providers.github).await.is_empty(), "nobody is asked");
    // A sentinel from the pinned organization is checked and sent: the refusal made no call.
    truth.github.lock().unwrap().insert(
        "acme/sre".into(),
        HashMap::from([("octocat".to_owned(), "active".to_owned())]),
    );
    let (status, ans) = t
        .post(&Hook::comment("gh-acme", "/p0 approve req-y 2h"))
        .await;
    assert_eq!(status, 202, "{ans}");
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls)[0].0,
        format!("/o/{ORG}/permission-requests/req-y/approve")
    );
    assert_eq!(t.settle().await.len(), 1);
}

// --- The same gate on every replica ---

/// A relay without the gate (an old release, or one started before the rollout) stores an
/// approve ungated; a relay with the gate on refuses to send it, without asking P0.
async fn an_ungated_approve_stored_elsewhere_is_refused(db: Option<&TestDb>) {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    // The relay without the gate cannot reach P0: the approve is dead after one attempt.
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("shared.db");
    let store_path = |t: &mut Setup| match db {
        Some(d) => t.store_url = Some(d.url()),
        None => t.store_path = Some(sqlite.clone()),
    };
    let mut without = Setup {
        vars: answer_vars(),
        top: providers.yaml(),
        p0_extra: "    max_attempts: 1\n".into(),
        ..Setup::default()
    };
    store_path(&mut without);
    let mut old = spawn_with(without).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&old.p0)
        .await;
    let (status, ans) = old.post(&pd_ack("01UNGATED")).await;
    assert_eq!(status, 202, "{ans}");
    let job = job_id(&ans);
    old.wait_for_calls(1).await;
    let store = match db {
        Some(d) => d.url(),
        None => sqlite.display().to_string(),
    };
    show_when(&store, job, "dead").await;
    old.stop().await;
    // The relay with the gate takes the store over and resends it: refused, never sent.
    let mut vars = answer_vars();
    vars.extend(PD_GATE.iter().map(|(k, v)| (*k, v.to_string())));
    let mut with = Setup {
        vars,
        top: providers.yaml(),
        store_extra: String::new(),
        ..Setup::default()
    };
    store_path(&mut with);
    let new = spawn_with(with).await;
    new.p0_ok().await;
    // The operator replays the dead-lettered approve; the gated relay takes it.
    let (code, out) = run_cli(
        &["jobs", "replay", &job.to_string(), "--db", &store],
        &test_env(&[]),
    );
    assert_eq!(code, Some(0), "{out}");
    let out = show_when(&store, job, "rejected").await;
    assert!(
        out.contains(
            "stored without the on-call check that rule `incident-acknowledged` has on this relay"
        ),
        "{out}"
    );
    let notes = posts(&new, &providers.pagerduty, 1).await;
    assert_eq!(
        body(&notes[0])["note"]["content"],
        "p0-relay: refused to approve request req-789, and did not ask P0: not checked on call: ask again."
    );
    assert!(
        new.settle().await.is_empty(),
        "P0 is never asked by the gated relay"
    );
}

#[tokio::test]
async fn a_gated_relay_refuses_an_ungated_approve_stored_by_another() {
    an_ungated_approve_stored_elsewhere_is_refused(None).await;
}

#[tokio::test]
async fn a_gated_relay_refuses_an_ungated_approve_stored_by_another_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    an_ungated_approve_stored_elsewhere_is_refused(Some(&db)).await;
}

// --- Never gated, and never started half-configured ---

#[tokio::test]
async fn a_resolve_is_never_checked_even_with_the_provider_down() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    let (t, _) = gated(&providers, &PD_GATE, None, "").await;
    t.p0_ok().await;
    // An approve under the incident first, so that its end has something to revoke.
    let (status, ans) = t.post(&pd_ack("01BEFORERES")).await;
    assert_eq!(status, 202, "{ans}");
    t.wait_for_calls(1).await;
    truth.down.store(503, Ordering::SeqCst);
    let before = gets(&providers.pagerduty).await.len();
    let resolved = testdata("pagerduty/incident_resolved.json");
    let (status, ans) = t.post(&Hook::pagerduty("wh-res-1", &resolved)).await;
    assert_eq!(status, 202, "{ans}");
    let calls = t.wait_for_calls(2).await;
    assert_eq!(summarize(&calls)[1], call("revoke", "req-789", json!({})));
    assert_eq!(
        gets(&providers.pagerduty).await.len(),
        before,
        "ending access asks nobody"
    );
}

#[test]
fn a_check_without_its_token_stops_the_start_and_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:9", &Setup::default());
    let vars = test_env(&PD_GATE);
    let (code, out) = run_cli(&["check", "--config", config.to_str().unwrap()], &vars);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("pagerduty.yaml: rule `note-command`: oncall: the pagerduty check needs answers.pagerduty.token (PAGERDUTY_API_TOKEN)"),
        "{out}"
    );
    let (code, out) = run_cli(&["serve", "--config", config.to_str().unwrap()], &vars);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("needs answers.pagerduty.token"), "{out}");
}

/// A gate must be pinned: PagerDuty's policies (or schedules), GitHub's organization. Without
/// them `check` fails and `serve` does not start, naming the variable to set.
#[test]
fn a_gate_without_its_pinned_scope_stops_the_start_and_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:9", &Setup::default());
    let config = config.to_str().unwrap();
    let tokens = [
        ("PAGERDUTY_API_TOKEN", PD_TOKEN),
        ("PAGERDUTY_FROM", "relay-bot@acme.example"),
        ("GITHUB_TOKEN", GH_TOKEN),
    ];
    for (on, want) in [
        (
            [("PAGERDUTY_ONCALL", "on"), ("PAGERDUTY_APPROVERS", "*")],
            "the pagerduty check needs pinned `escalation_policies` (PAGERDUTY_ONCALL_ESCALATION_POLICIES) or `schedules` (PAGERDUTY_ONCALL_SCHEDULES)",
        ),
        (
            [("GITHUB_ONCALL", "on"), ("GITHUB_ONCALL_TEAMS", "sre")],
            "the github check needs a pinned `org` (GITHUB_ONCALL_ORG)",
        ),
    ] {
        let mut vars = test_env(&tokens);
        vars.extend(on.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        for command in ["check", "serve"] {
            let (code, out) = run_cli(&[command, "--config", config], &vars);
            assert_eq!(code, Some(1), "{command}: {out}");
            assert!(out.contains(want), "{command}: {out}");
        }
    }
}
