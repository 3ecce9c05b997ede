//! On-call gates, black-box: the real relay on port 0 against a fake P0 and fake PagerDuty,
//! Opsgenie and GitHub APIs. The fakes answer with the example bodies of the providers' API
//! descriptions (deploy/contracts/), and every call the relay makes to them is checked against
//! those descriptions. An approve reaches P0 only once the provider says its actor was on call
//! (or in the team); a refusal is answered back; a check that cannot be made is retried, and
//! dead-lettered past the decision's max age.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bindings::{
    GH_TOKEN, OG_KEY, PD_TOKEN, Providers, answer_vars, body, check_contract, check_response,
    header, pd_note, spec,
};
use crate::common::pg::TestDb;
use crate::common::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

/// The agent of the PagerDuty samples, the escalation policy the acknowledged sample names,
/// and the incident both are on.
const USER: &str = "PLH1HKV";
const POLICY: &str = "PUS0KTE";
const INCIDENT: &str = "PGR0VU2";
const SCHEDULE: &str = "PI7DH85";

/// What the fake providers say: who is on call, and whether they answer at all.
#[derive(Default)]
struct Truth {
    /// PagerDuty on-calls: (user, escalation policy, level, schedule), 03:47-15:47 UTC on the
    /// samples' day.
    pagerduty: Mutex<Vec<(String, String, u64, String)>>,
    /// Opsgenie schedule name -> its on-call participants.
    opsgenie: Mutex<HashMap<String, Vec<String>>>,
    /// GitHub `org/team` -> login -> membership state.
    github: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Not zero: every provider GET answers this status (503: the provider is down).
    down: AtomicU16,
}

impl Truth {
    fn pd_on_call(&self, user: &str, level: u64) {
        self.pagerduty
            .lock()
            .unwrap()
            .push((user.into(), POLICY.into(), level, SCHEDULE.into()));
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
    let q: Vec<(String, String)> = req.url.query_pairs().into_owned().collect();
    let all = |k: &str| -> Vec<String> {
        q.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let (users, policies, schedules) = (
        all("user_ids[]"),
        all("escalation_policy_ids[]"),
        all("schedule_ids[]"),
    );
    let template = example("pagerduty-oncall.json", "/oncalls")["oncalls"][0].clone();
    let oncalls: Vec<Value> = truth
        .pagerduty
        .lock()
        .unwrap()
        .iter()
        .filter(|(u, p, _, s)| {
            (users.is_empty() || users.contains(u))
                && (policies.is_empty() || policies.contains(p))
                && (schedules.is_empty() || schedules.contains(s))
        })
        .map(|(u, p, level, s)| {
            let mut o = template.clone();
            o["user"]["id"] = u.as_str().into();
            o["escalation_policy"]["id"] = p.as_str().into();
            o["schedule"]["id"] = s.as_str().into();
            o["escalation_level"] = (*level).into();
            o["start"] = "2026-11-27T03:47:00Z".into();
            o["end"] = "2026-11-27T15:47:00Z".into();
            o
        })
        .collect();
    json!({ "oncalls": oncalls, "limit": 100, "offset": 0, "more": false })
}

fn og_oncalls(truth: &Truth, schedule: &str) -> Option<Value> {
    let people = truth.opsgenie.lock().unwrap().get(schedule).cloned()?;
    let mut v = example(
        "opsgenie-oncall.json",
        "/v2/schedules/{identifier}/on-calls",
    );
    v["data"]["_parent"]["name"] = schedule.into();
    v["data"]["onCallRecipients"] = json!(people);
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

/// The POSTs `server` received (the answers back), once there are `n`.
async fn posts(server: &MockServer, n: usize) -> Vec<Request> {
    let all = received_at_least(server, n).await;
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

/// The acknowledged sample (its event names the escalation policy), as event `event_id`.
fn pd_ack(event_id: &str) -> Hook {
    let mut v: Value =
        serde_json::from_slice(&testdata("pagerduty/incident_acknowledged.json")).unwrap();
    v["event"]["id"] = event_id.into();
    Hook::pagerduty(&format!("wh-{event_id}"), &serde_json::to_vec(&v).unwrap())
}

// --- The fakes themselves answer as the descriptions say ---

#[test]
fn the_fakes_answer_in_the_described_shapes() {
    let truth = Truth::default();
    truth.pd_on_call(USER, 1);
    truth.opsgenie.lock().unwrap().insert(
        "Orders on-call".into(),
        vec!["jane.doe@acme.example".into()],
    );
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
        url: "http://x/oncalls?user_ids%5B%5D=P1&since=2026-11-27T10:20:00Z"
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

/// On call: the acknowledgement's escalation policy is asked about at the event's time,
/// the approve is sent once, and `jobs show` names the check and what PagerDuty said.
async fn an_on_call_acknowledgement_approves(db: Option<&TestDb>) {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    let (t, store) = gated(&providers, &[("PAGERDUTY_ONCALL", "on")], db, "").await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_ack("01ONCALLACK1")).await;
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
            ("since", "2026-11-27T10:20:00Z"),
            ("until", "2026-11-27T10:30:00Z"),
            ("limit", "100"),
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
            "  on call:    checked before P0 is called: PagerDuty: {USER} on call for escalation policy {POLICY}, as of 2026-11-27T10:20:31Z"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  evidence:   on call: escalation policy {POLICY} level 1 (schedule {SCHEDULE}), 03:47-15:47 UTC on 2026-11-27 (PagerDuty, for {USER} at 2026-11-27T10:20:31Z); checked 20"
        )),
        "{out}"
    );
    let notes = posts(&providers.pagerduty, 1).await;
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
/// not on call for it, P0 is never asked, and the refusal is answered on the incident.
async fn a_note_by_someone_not_on_call_is_refused(db: Option<&TestDb>) {
    let (providers, truth) = fakes().await;
    truth.pd_on_call("PXOTHER", 1);
    let (t, store) = gated(&providers, &[("PAGERDUTY_ONCALL", "on")], db, "").await;
    t.p0_ok().await;
    let (status, ans) = t
        .post(&pd_note(
            "01ONCALLNOTE1",
            INCIDENT,
            "/p0 approve req-321 30m",
        ))
        .await;
    assert_eq!(
        (status, ans["status"].as_str()),
        (202, Some("accepted")),
        "{ans}"
    );
    let job = job_id(&ans);
    let out = show_when(&store, job, "rejected").await;
    let why = format!(
        "not on call: {USER} at 2026-11-27T10:25:44Z is not on call for escalation policy {POLICY}"
    );
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
    let notes = posts(&providers.pagerduty, 1).await;
    assert_eq!(notes[0].url.path(), format!("/incidents/{INCIDENT}/notes"));
    let text = body(&notes[0])["note"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.starts_with(&format!(
            "p0-relay: refused to approve request req-321, and did not ask P0: {why}; checked 20"
        )),
        "{text}"
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

#[tokio::test]
async fn pagerduty_on_call_above_the_highest_level_allowed_is_refused() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 2);
    let (t, store) = gated(
        &providers,
        &[
            ("PAGERDUTY_ONCALL", "on"),
            ("PAGERDUTY_ONCALL_MAX_LEVEL", "1"),
        ],
        None,
        "",
    )
    .await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_ack("01ONCALLLVL2")).await;
    assert_eq!(status, 202, "{ans}");
    let out = show_when(&store, job_id(&ans), "rejected").await;
    assert!(
        out.contains(&format!(
            "  evidence:   not on call at level 1 or lower: {USER} at 2026-11-27T10:20:31Z is on call for escalation policy {POLICY} only at level 2"
        )),
        "{out}"
    );
    let notes = posts(&providers.pagerduty, 1).await;
    assert!(
        body(&notes[0])["note"]["content"]
            .as_str()
            .unwrap()
            .contains("not on call at level 1 or lower"),
    );
    assert!(t.settle().await.is_empty(), "P0 is never asked");
}

#[tokio::test]
async fn pagerduty_down_then_back_approves_once() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    truth.down.store(503, Ordering::SeqCst);
    let (t, store) = gated(&providers, &[("PAGERDUTY_ONCALL", "on")], None, "").await;
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
        posts(&providers.pagerduty, 1).await.len(),
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
    let (t, store) = gated(
        &providers,
        &[("PAGERDUTY_ONCALL", "on")],
        None,
        "    max_age: 1s\n",
    )
    .await;
    t.p0_ok().await;
    let (status, ans) = t.post(&pd_ack("01ONCALLDEAD1")).await;
    assert_eq!(status, 202, "{ans}");
    let out = show_when(&store, job_id(&ans), "dead").await;
    assert!(out.contains("on-call check: pagerduty: "), "{out}");
    let notes = posts(&providers.pagerduty, 1).await;
    let text = body(&notes[0])["note"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.starts_with(
            "p0-relay: refused to approve request req-789, and did not ask P0: the on-call check could not be made"
        ),
        "{text}"
    );
    // Back now, too late: the decision stays dead and P0 is never asked.
    truth.down.store(0, Ordering::SeqCst);
    assert!(t.settle().await.is_empty(), "never approved on doubt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_a_thousand_gated_decisions_asks_pagerduty_once() {
    let (providers, truth) = fakes().await;
    truth.pd_on_call(USER, 1);
    let (t, _) = gated(&providers, &[("PAGERDUTY_ONCALL", "on")], None, "").await;
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
    assert_eq!(
        paths,
        [format!("/incidents/{INCIDENT}").as_str(), "/oncalls"],
        "one incident fetch and one on-call ask serve the whole storm"
    );
    t.wait_metric(
        "p0_relay_oncall_checks_total{provider=\"pagerduty\",result=\"on_call\"}",
        n as f64,
    )
    .await;
}

// --- Opsgenie ---

#[tokio::test]
async fn opsgenie_an_on_call_participant_approves_and_a_stranger_is_refused() {
    let (providers, truth) = fakes().await;
    truth.opsgenie.lock().unwrap().insert(
        "Orders on-call".into(),
        vec!["Jane.Doe@acme.example".into()],
    );
    let (t, store) = gated(
        &providers,
        &[
            ("OPSGENIE_ONCALL", "on"),
            ("OPSGENIE_ONCALL_SCHEDULES", "Orders on-call"),
        ],
        None,
        "",
    )
    .await;
    t.p0_ok().await;
    let ack = testdata("opsgenie/acknowledge.json");
    let (status, ans) = t.post(&Hook::opsgenie(&ack)).await;
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
        out.contains("  evidence:   on call: schedule Orders on-call at 2025-11-27T10:25:00Z (Opsgenie, for jane.doe@acme.example); checked 20"),
        "{out}"
    );
    let checks = gets(&providers.opsgenie).await;
    assert_eq!(checks.len(), 1);
    assert_eq!(
        checks[0].url.path(),
        "/v2/schedules/Orders%20on-call/on-calls"
    );
    assert_eq!(
        query(&checks[0]),
        [
            ("scheduleIdentifierType", "name"),
            ("flat", "true"),
            ("date", "2025-11-27T10:25:00Z"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    assert_eq!(
        header(&checks[0], "authorization"),
        format!("GenieKey {OG_KEY}")
    );
    conform("opsgenie-oncall.json", &checks);

    // Another alert, acknowledged within the same minute by someone off call.
    let mut v: Value = serde_json::from_slice(&ack).unwrap();
    v["alert"]["alertId"] = "b2c3d4e5-0000-47a8-9b0c-1d2e3f4a5b6c-1764238800999".into();
    v["alert"]["username"] = "mallory@acme.example".into();
    v["alert"]["details"]["p0_request_id"] = "req-655".into();
    let (status, ans) = t
        .post(&Hook::opsgenie(&serde_json::to_vec(&v).unwrap()))
        .await;
    assert_eq!(status, 202, "{ans}");
    let out = show_when(&store, job_id(&ans), "rejected").await;
    assert!(
        out.contains("  evidence:   not on call: mallory@acme.example is not an on-call participant of schedule Orders on-call at 2025-11-27T10:25:00Z"),
        "{out}"
    );
    let notes = posts(&providers.opsgenie, 2).await;
    let refusal = notes
        .iter()
        .find(|n| n.url.path().contains("b2c3d4e5"))
        .expect("the refusal is noted on its alert");
    assert!(
        body(refusal)["note"].as_str().unwrap().starts_with(
            "p0-relay: refused to approve request req-655, and did not ask P0: not on call: "
        ),
        "{:?}",
        body(refusal)
    );
    assert_eq!(
        gets(&providers.opsgenie).await.len(),
        1,
        "the minute's answer is reused"
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
    // The approve gets its reaction; each refusal a reaction and a comment on the issue.
    let answers = posts(&providers.github, 5).await;
    let comments: Vec<String> = answers
        .iter()
        .filter(|r| r.url.path() == "/repos/acme/infra/issues/42/comments")
        .map(|r| body(r)["body"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(comments.len(), 2, "{comments:?}");
    assert!(
        comments
            .iter()
            .all(|c| c.contains("and did not ask P0: not a member: ")),
        "{comments:?}"
    );
    assert_eq!(t.settle().await.len(), 1);
}

// --- Never gated, and never started half-configured ---

#[tokio::test]
async fn a_resolve_is_never_checked_even_with_the_provider_down() {
    let (providers, truth) = fakes().await;
    truth.down.store(503, Ordering::SeqCst);
    let (t, _) = gated(&providers, &[("PAGERDUTY_ONCALL", "on")], None, "").await;
    t.p0_ok().await;
    let resolved = testdata("pagerduty/incident_resolved.json");
    let (status, ans) = t.post(&Hook::pagerduty("wh-res-1", &resolved)).await;
    assert_eq!(status, 202, "{ans}");
    let calls = t.wait_for_calls(1).await;
    assert_eq!(
        summarize(&calls),
        vec![call("revoke", "req-789", json!({}))]
    );
    assert!(
        gets(&providers.pagerduty).await.is_empty(),
        "ending access asks nobody"
    );
}

#[test]
fn a_check_without_its_token_stops_the_start_and_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:9", &Setup::default());
    let vars = test_env(&[("PAGERDUTY_ONCALL", "on")]);
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
