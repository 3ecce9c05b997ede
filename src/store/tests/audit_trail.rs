//! The audit trail's contract, on both stores: one event for each step, with what it is about,
//! numbered without gaps in commit order; seals that verify on an untouched store and name
//! what changed, was removed or was inserted behind the store's back; retention behind a
//! seal, apart from the jobs.

use super::*;
use crate::secret::Secret;
use crate::store::audit::{About, AuditEvent, Body, Kind as Event, NotSealed, Sealer};

/// (event, outcome, job, request) of each event, in order.
fn steps(events: &[Body]) -> Vec<(&'static str, String, Option<i64>, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                e.event.as_str(),
                e.outcome.clone(),
                e.job_id,
                e.about.request_id.clone(),
            )
        })
        .collect()
}

fn step(
    event: &'static str,
    outcome: &str,
    job: Option<i64>,
    request: &str,
) -> (&'static str, String, Option<i64>, Option<String>) {
    (event, outcome.into(), job, Some(request.into()))
}

on_both_stores!(every_step_of_a_decision_is_one_audit_event_in_commit_order);
async fn every_step_of_a_decision_is_one_audit_event_in_commit_order(mut s: Backend) {
    // Long on purpose: one decision's life, step by step, and the events each step made.
    s.approve_on("d1", "a", "P1", 1_000).await;
    s.approve_on("d2", "a", "P1", 1_100).await;
    let mut stale = on_subject("d3", &[(Action::Approve, "b")], "P1", false);
    stale.refused = Some("event is 2h old".into());
    s.accept(stale, 1_200).await;
    // A duplicate makes none.
    s.approve_on("d1", "a", "P1", 1_300).await;
    // A delivery refused as it was received: nothing stored but its event.
    let mut stranger = AuditEvent::new(Event::Refused, None, "refused");
    stranger.about = Some(About {
        source: Some("github".into()),
        rule: Some("r".into()),
        actor: Some("mallory".into()),
        action: Some("approve".into()),
        request_id: Some("x".into()),
        delivery: Some("d9".into()),
        ..About::default()
    });
    stranger.reason = Some("mallory is not an approver".into());
    s.clock.set(1_400);
    s.store.record_events(vec![stranger]).await.unwrap();
    // Sent: the worker's event, about its job as stored; a refusal the store made has its
    // event already, and an outcome whose claim was lost makes none.
    let due = s.claim_due(2_000, 10).await;
    let (a, b) = (claimed(&due, 1), claimed(&due, 2));
    let mut sent = with_a_note(done(a, State::Succeeded));
    let mut call = AuditEvent::new(Event::Sent, Some(1), "success");
    call.status = Some(200);
    sent.settled.audit = vec![call];
    s.write(&[], &[sent.clone(), done(b, State::Rejected)], 2_000)
        .await
        .unwrap();
    s.write(&[], &[sent], 2_100).await.unwrap();
    // Answered.
    let answer = s.claim_answers(3_000, 10).await.remove(0);
    let mut answered = AuditEvent::new(Event::Answered, Some(1), "sent");
    answered.detail = Some("pagerduty note".into());
    s.record_answer(&AnswerRecord {
        id: answer.id,
        claim_token: answer.claim_token,
        at_ms: 3_000,
        state: State::Succeeded,
        attempts: 1,
        next_attempt_at_ms: 3_000,
        status: Some(201),
        error: None,
        audit: vec![answered],
    })
    .await;
    // Revoked by the subject's end.
    s.accept(on_subject("d4", &[], "P1", true), 4_000).await;
    // A deny that dies, and is replayed.
    s.accept(delivery("d5", &[(Action::Deny, "c")]), 5_000)
        .await;
    let due = s.claim_due(5_000, 10).await;
    let mut dead = done(claimed(&due, 4), State::Dead);
    dead.settled.audit = vec![
        AuditEvent::new(Event::Sent, Some(4), "transient"),
        AuditEvent::new(Event::Dead, Some(4), "transient"),
    ];
    s.write(&[], &[dead], 5_000).await.unwrap();
    s.replay(Replay::One(4), 6_000).await;

    let events = s.events().await;
    assert_eq!(
        steps(&events),
        [
            step("accepted", "queued", Some(1), "a"),
            step("accepted", "coalesced", Some(1), "a"),
            step("refused", "refused", Some(2), "b"),
            step("refused", "refused", None, "x"),
            step("sent", "success", Some(1), "a"),
            step("answered", "sent", Some(1), "a"),
            step("revoked", "queued", Some(3), "a"),
            step("accepted", "queued", Some(4), "c"),
            step("sent", "transient", Some(4), "c"),
            step("dead", "transient", Some(4), "c"),
            step("replayed", "queued", Some(4), "c"),
        ]
    );
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=11).collect::<Vec<_>>(),
        "no gaps, in commit order"
    );
    // What the first call is about was read from its job and its delivery.
    let about = |source: &str, actor: &str, action: &str, request: &str, delivery: &str| About {
        source: Some(source.into()),
        rule: Some("r".into()),
        actor: Some(actor.into()),
        action: Some(action.into()),
        request_id: Some(request.into()),
        org: Some("acme".into()),
        subject: Some("P1".into()),
        delivery: Some(delivery.into()),
    };
    assert_eq!(
        events[4].about,
        about("github", "octocat", "approve", "a", "d1")
    );
    assert_eq!(
        (events[4].time.as_str(), events[4].status),
        ("1970-01-01T00:00:02.000Z", Some(200))
    );
    assert_eq!(
        events[0].about,
        about("github", "octocat", "approve", "a", "d1")
    );
    assert_eq!(events[2].reason.as_deref(), Some("event is 2h old"));
    assert_eq!(events[3].about.actor.as_deref(), Some("mallory"));
    assert_eq!(
        events[3].reason.as_deref(),
        Some("mallory is not an approver")
    );
    assert_eq!(events[5].detail.as_deref(), Some("pagerduty note"));
    assert_eq!(
        events[6].about,
        about("github", "octocat", "revoke", "a", "d4")
    );
    assert_eq!(events[6].reason.as_deref(), Some("its subject ended"));
    assert_eq!(events[10].operator.as_deref(), Some("tester"));
    // Stored as the relay writes a body, byte for byte, on both stores (fields in order, unset
    // ones left out): the events a delivery's write makes (accepted, refused by the store,
    // revoked; PostgreSQL builds them in SQL) and those that need nothing looked up (a refusal
    // on receipt). PostgreSQL completes the others from their jobs and prints them as JSONB.
    let rows = s.audit_rows().await;
    for i in [0, 1, 2, 3, 6, 7] {
        assert_eq!(rows[i].body, events[i].text(), "event {}", events[i].id);
    }
    // Pruning the jobs leaves the events.
    s.prune(10_000_000).await;
    assert_eq!(s.events().await, events);
}

/// A trail of ten events, sealed at 10 s (with `key`) over the first nine, then two more
/// events and a second seal at 20 s.
async fn sealed(s: &mut Backend, key: Option<&Secret>) {
    for i in 0..9 {
        let d = delivery(&format!("d{i}"), &[(Action::Deny, &format!("r{i}"))]);
        s.accept(d, 1_000 + i).await;
    }
    assert_eq!(s.seal(key, 10_000).await, Some(10), "the first seal");
    assert_eq!(s.seal(key, 10_500).await, None, "nothing new to seal");
    for i in 9..11 {
        let d = delivery(&format!("d{i}"), &[(Action::Deny, &format!("r{i}"))]);
        s.accept(d, 11_000 + i).await;
    }
    assert_eq!(s.seal(key, 20_000).await, Some(13));
    let ok = s.verify(key).await;
    assert_eq!(ok.problem, None);
    assert_eq!(
        (ok.events, ok.seals, ok.sealed_through, ok.unsealed),
        (13, 2, Some(12), 0)
    );
    // Seals need nothing looked up: stored as the relay writes them, on both stores.
    let (rows, events) = (s.audit_rows().await, s.events().await);
    for i in [9, 12] {
        assert_eq!(rows[i].event, "seal");
        assert_eq!(rows[i].body, events[i].text());
    }
}

fn key() -> Secret {
    Secret::new("an audit key, 32 bytes long....")
}

/// After `sql` runs behind the store's back, `verify` (with `key`) fails saying `problem`.
async fn fails_after(s: &Backend, sql: &str, key: Option<&Secret>, problem: &str) {
    s.behind_its_back(sql).await;
    let found = s.verify(key).await.problem.unwrap_or_default();
    assert!(found.contains(problem), "{found}");
}

/// A trail sealed without a key (`sealed`) fails to verify, saying `problem`, once `sql` runs.
async fn sealed_then_fails_after(mut s: Backend, sql: &str, problem: &str) {
    sealed(&mut s, None).await;
    fails_after(&s, sql, None, problem).await;
}

on_both_stores!(a_sealed_trail_verifies_and_an_edited_event_is_named);
async fn a_sealed_trail_verifies_and_an_edited_event_is_named(s: Backend) {
    let sql = "UPDATE audit_events SET body = replace(body, 'octocat', 'mallory') WHERE id = 4";
    sealed_then_fails_after(s, sql, "event 4 was changed").await;
}

on_both_stores!(a_removed_event_is_named);
async fn a_removed_event_is_named(s: Backend) {
    let sql = "DELETE FROM audit_events WHERE id = 6";
    sealed_then_fails_after(s, sql, "event 6 was removed").await;
}

on_both_stores!(events_removed_from_the_end_are_not_numbered_again);
/// Events removed from the end of the trail behind a running relay's back (none of them
/// sealed yet) leave a gap: the next event is numbered after the last the relay wrote, so
/// `verify` names the gap and the relay will not seal over it.
async fn events_removed_from_the_end_are_not_numbered_again(mut s: Backend) {
    sealed(&mut s, None).await;
    for i in 20..22 {
        let d = delivery(&format!("d{i}"), &[(Action::Deny, &format!("r{i}"))]);
        s.accept(d, 21_000 + i).await;
    }
    s.behind_its_back("DELETE FROM audit_events WHERE id > 13")
        .await;
    let d = delivery("d30", &[(Action::Deny, "r30")]);
    s.accept(d, 30_000).await;
    let last = s.audit_rows().await.last().map(|r| r.id);
    assert_eq!(last, Some(16), "numbered after the last event written");
    let found = s.verify(None).await.problem.unwrap_or_default();
    assert!(found.contains("14"), "{found}");
    let over = s.store.seal_before(i64::MAX).await.unwrap();
    let refused = s.store.seal(None, over).await.unwrap_err().to_string();
    assert!(
        refused.contains("audit events 14..15 are missing"),
        "{refused}"
    );
}

on_both_stores!(an_inserted_event_is_named);
async fn an_inserted_event_is_named(mut s: Backend) {
    sealed(&mut s, None).await;
    // Room made at 5 by moving every later event up one, and a forged event put there with a
    // digest of the right form.
    let forged =
        r#"{"id":5,"time":"1970-01-01T00:00:01.004Z","event":"accepted","outcome":"queued"}"#;
    let digest = audit::digest(5, 1_004, "accepted", forged);
    let sql = format!(
        "UPDATE audit_events SET id = id + 1000 WHERE id >= 5;
         UPDATE audit_events SET id = id - 999 WHERE id >= 1000;
         INSERT INTO audit_events (id, at, event, body, digest)
             VALUES (5, 1004, 'accepted', '{forged}', {});",
        bytes(&s, &digest)
    );
    fails_after(
        &s,
        &sql,
        None,
        "event 6 is not the event written with that ID (its body says 5)",
    )
    .await;
}

on_both_stores!(an_event_rewritten_with_its_digest_fails_its_seal);
async fn an_event_rewritten_with_its_digest_fails_its_seal(mut s: Backend) {
    sealed(&mut s, None).await;
    let row = s.audit_rows().await.remove(3);
    let body = row.body.replace("octocat", "mallory");
    let digest = audit::digest(row.id, row.at_ms, &row.event, &body);
    let sql = format!(
        "UPDATE audit_events SET body = '{body}', digest = {} WHERE id = 4",
        bytes(&s, &digest)
    );
    fails_after(&s, &sql, None, "seal 10 does not match events 1..=9").await;
}

on_both_stores!(keyed_seals_rewritten_without_the_key_fail);
async fn keyed_seals_rewritten_without_the_key_fail(mut s: Backend) {
    let key = key();
    sealed(&mut s, Some(&key)).await;
    // Without the key, keyed seals cannot be checked: that is not a pass.
    let unkeyed = s.verify(None).await.problem.unwrap_or_default();
    assert!(unkeyed.contains("seal 10 is keyed"), "{unkeyed}");
    // Someone with the database alone edits event 4 and makes every digest and seal again,
    // without the key: the seals no longer verify with it.
    let rows = s.audit_rows().await;
    let mut sql = String::new();
    let mut covered = Vec::new();
    for row in rows.iter().filter(|r| r.id < 10) {
        let body = match row.id {
            4 => row.body.replace("octocat", "mallory"),
            _ => row.body.clone(),
        };
        let digest = audit::digest(row.id, row.at_ms, &row.event, &body);
        covered.push(digest);
        sql.push_str(&format!(
            "UPDATE audit_events SET body = '{body}', digest = {} WHERE id = {};",
            bytes(&s, &digest),
            row.id
        ));
    }
    let resealed = audit::seal_digest(None, &audit::GENESIS, &covered);
    let seal = rows.iter().find(|r| r.id == 10).unwrap();
    let body = seal
        .body
        .replace("\"keyed\":true", "\"keyed\":false")
        .replace("\"keyed\": true", "\"keyed\": false");
    let stored = serde_json::from_str::<Body>(&seal.body).unwrap();
    let body = body.replace(
        stored.covers.unwrap().digest.unwrap().as_str(),
        &hex::encode(resealed),
    );
    sql.push_str(&format!(
        "UPDATE audit_events SET body = '{body}', digest = {} WHERE id = 10;",
        bytes(&s, &audit::digest(10, seal.at_ms, "seal", &body))
    ));
    fails_after(
        &s,
        &sql,
        Some(&key),
        "seal 10 is not keyed though a key was given",
    )
    .await;
}

on_both_stores!(retention_removes_events_behind_a_seal_that_stands_for_them);
async fn retention_removes_events_behind_a_seal_that_stands_for_them(mut s: Backend) {
    sealed(&mut s, None).await;
    // Before 15 s: the first seal (at 10 s, over 1..=9) is the last one written.
    let removed = s
        .prune_with(Prune {
            finished_before_ms: 0,
            ends_before_ms: 0,
            audit_before_ms: 15_000,
            audit_key: None,
        })
        .await;
    assert_eq!(removed, 9);
    let events = s.events().await;
    assert_eq!(events.first().map(|e| e.id), Some(10), "the seal stays");
    let pruned = events.last().unwrap();
    assert_eq!(pruned.event, Event::Pruned);
    let covers = pruned.covers.clone().unwrap();
    assert_eq!((covers.from, covers.to, covers.count), (1, 9, 9));
    let ok = s.verify(None).await;
    assert_eq!((ok.problem, ok.from), (None, Some(10)));
    // Events removed with no `pruned` event saying so do not verify.
    fails_after(
        &s,
        &format!("DELETE FROM audit_events WHERE id = {}", pruned.id),
        None,
        "events 1..=9 were removed, and no `pruned` event records it",
    )
    .await;
}

/// `digest` as a literal of the backend's SQL.
fn bytes(s: &Backend, digest: &[u8]) -> String {
    match s.kind {
        Kind::Sqlite(_) => format!("X'{}'", hex::encode(digest)),
        Kind::Pg(_) => format!("'\\x{}'::BYTEA", hex::encode(digest)),
    }
}

on_both_stores!(a_removal_stands_only_when_a_relay_holding_the_key_recorded_it);
async fn a_removal_stands_only_when_a_relay_holding_the_key_recorded_it(mut s: Backend) {
    let key = key();
    sealed(&mut s, Some(&key)).await;
    let removed = s
        .prune_with(Prune {
            finished_before_ms: 0,
            ends_before_ms: 0,
            audit_before_ms: 15_000,
            audit_key: Some(key.clone()),
        })
        .await;
    assert_eq!(removed, 9);
    let ok = s.verify(Some(&key)).await;
    assert_eq!((ok.problem, ok.from), (None, Some(10)));
    // Someone with the database alone writes a `pruned` event of the right form (here the
    // relay's own, its tag replaced and the row's digest made again): without the key, its
    // tag cannot be the key's.
    let rows = s.audit_rows().await;
    let pruned = rows.iter().find(|r| r.event == "pruned").unwrap();
    let stored = serde_json::from_str::<Body>(&pruned.body).unwrap();
    let tag = stored.covers.unwrap().digest.unwrap();
    let body = pruned
        .body
        .replace(tag.as_str(), &hex::encode(audit::GENESIS));
    let digest = audit::digest(pruned.id, pruned.at_ms, "pruned", &body);
    let sql = format!(
        "UPDATE audit_events SET body = '{body}', digest = {} WHERE id = {}",
        bytes(&s, &digest),
        pruned.id
    );
    fails_after(
        &s,
        &sql,
        Some(&key),
        &format!(
            "pruned event {} was not written by a relay holding the key",
            pruned.id
        ),
    )
    .await;
}

on_both_stores!(a_relay_seals_no_trail_whose_seals_were_removed_behind_its_back);
async fn a_relay_seals_no_trail_whose_seals_were_removed_behind_its_back(mut s: Backend) {
    let key = key();
    let (mut one, mut other) = (Sealer::default(), Sealer::default());
    let d = |i: usize| delivery(&format!("d{i}"), &[(Action::Deny, &format!("r{i}"))]);
    s.accept(d(0), 1_000).await;
    s.clock.set(2_000);
    let first = one.seal(&s.store, Some(&key)).await.unwrap().unwrap().0;
    // Another relay seals the next events: the first follows its seal from then on.
    s.accept(d(1), 3_000).await;
    s.clock.set(4_000);
    let second = other.seal(&s.store, Some(&key)).await.unwrap().unwrap().0;
    s.accept(d(2), 5_000).await;
    s.clock.set(6_000);
    let third = one.seal(&s.store, Some(&key)).await.unwrap().unwrap().0;
    assert!(first < second && second < third);
    // The other looks at its next turn: nothing new to seal, and it knows the latest seal.
    assert_eq!(other.seal(&s.store, Some(&key)).await.unwrap(), None);
    // Someone with the database alone removes the last seal, to have the relays seal events
    // it covered once they are rewritten: neither relay seals again.
    s.behind_its_back(&format!("DELETE FROM audit_events WHERE id = {third}"))
        .await;
    s.accept(d(3), 7_000).await;
    s.clock.set(8_000);
    for sealer in [&mut one, &mut other] {
        let refused = sealer.seal(&s.store, Some(&key)).await.unwrap_err();
        assert!(
            matches!(&refused, NotSealed::Changed(why) if why.contains(&format!("seal {third} "))),
            "{refused}"
        );
    }
    assert_eq!(
        s.store.seal_before(i64::MAX).await.unwrap().map(|x| x.id),
        Some(second)
    );
}

on_both_stores!(relays_on_different_keys_go_on_sealing_during_a_key_rollout);
async fn relays_on_different_keys_go_on_sealing_during_a_key_rollout(mut s: Backend) {
    let (old, new) = (key(), Secret::new("the next audit key, 32 bytes..."));
    let mut sealers = [(Sealer::default(), &old), (Sealer::default(), &new)];
    for i in 0..4 {
        let now = 1_000 * (i as i64 + 1);
        s.accept(delivery(&format!("k{i}"), &[(Action::Deny, "r")]), now)
            .await;
        s.clock.set(now + 500);
        let (sealer, key) = &mut sealers[i % 2];
        let sealed = sealer.seal(&s.store, Some(*key)).await;
        assert!(matches!(sealed, Ok(Some(_))), "turn {i}: {sealed:?}");
    }
}

on_both_stores!(events_escape_what_senders_and_p0_wrote_as_the_relay_does);
async fn events_escape_what_senders_and_p0_wrote_as_the_relay_does(mut s: Backend) {
    // Actors, rules and keys come from payloads: quotes, backslashes, control characters and
    // non-ASCII text are escaped in the stored body exactly as the relay writes JSON.
    let mut d = delivery("k \"1\"\\\u{1}\t", &[(Action::Approve, "r1")]);
    d.actor = Some("mal\"lory\\\n\u{1f}é😀".into());
    d.rule = "rule </script> \u{7f}ü".into();
    s.accept(d, 1_000).await;
    let mut no_actor = delivery("k2", &[(Action::Deny, "x")]);
    no_actor.actor = None;
    s.accept(no_actor, 1_100).await;
    // An event the relay makes about what it knows (the worker's are such), with P0's text.
    let mut refused = AuditEvent::new(Event::Refused, None, "refused");
    refused.about = Some(About {
        source: Some("github".into()),
        actor: Some("a\"b".into()),
        ..About::default()
    });
    refused.detail = Some("P0 said \"no\"\u{0}\u{2028}".into());
    s.clock.set(1_200);
    s.store.record_events(vec![refused]).await.unwrap();
    let (rows, events) = (s.audit_rows().await, s.events().await);
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[2].detail.as_deref(),
        Some("P0 said \"no\"\u{0}\u{2028}")
    );
    assert_eq!(
        events[0].about.actor.as_deref(),
        Some("mal\"lory\\\n\u{1f}é😀")
    );
    assert_eq!(
        events[0].about.delivery.as_deref(),
        Some("k \"1\"\\\u{1}\t")
    );
    assert_eq!(events[1].about.actor, None, "an unset field is left out");
    for (row, event) in rows.iter().zip(&events) {
        assert_eq!(row.body, event.text());
    }
}
