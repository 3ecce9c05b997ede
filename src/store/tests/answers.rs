//! The contract for answers back: created with the final outcome, claimed once, recorded only
//! under the current claim, pruned with their decision.

use super::*;

contract!(answers_are_created_with_the_final_outcome_and_claimed_once);
async fn answers_are_created_with_the_final_outcome_and_claimed_once(mut s: Backend) {
    s.accept(
        on_subject("d1", &[(Action::Approve, "a")], "P1", false),
        1_000,
    )
    .await;
    let job = s.claim_due(1_000, 1).await.remove(0);
    let mut rec = done(&job, State::Succeeded);
    rec.answers = vec![NewAnswer {
        via: "pagerduty".into(),
        kind: "note".into(),
        target: r#"{"incident":"P1"}"#.into(),
        body: r#"{"note":{"content":"done"}}"#.into(),
    }];
    s.write(&[], &[rec], 2_000).await.unwrap();
    let claimed = s.claim_answers(2_000, 10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].job_id, job.id);
    let a = &claimed[0];
    assert_eq!(
        (a.via.as_str(), a.kind.as_str(), a.target.as_str()),
        ("pagerduty", "note", r#"{"incident":"P1"}"#)
    );
    assert_eq!(a.body, r#"{"note":{"content":"done"}}"#);
    assert_eq!((a.attempts, a.window_start_ms), (0, 2_000));
    assert!(s.claim_answers(2_000, 10).await.is_empty(), "claimed once");
    // A stop while it was in flight: it is sent again after the start.
    assert_eq!(s.recover(2_000 + LEASE.as_millis() as i64 + 1).await, 0);
    let again = s
        .claim_answers(2_000 + LEASE.as_millis() as i64 + 1, 10)
        .await;
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].claim_token, claimed[0].claim_token);
    let rec = |a: &AnswerJob, state| AnswerRecord {
        id: a.id,
        claim_token: a.claim_token,
        at_ms: 40_000,
        state,
        attempts: 1,
        next_attempt_at_ms: 40_000,
        status: Some(201),
        error: None,
    };
    // The stale claim's outcome is ignored; the current one's is kept.
    s.record_answer(&rec(&claimed[0], State::Dead)).await;
    s.record_answer(&rec(&again[0], State::Succeeded)).await;
    let d = s.show(job.id).await.unwrap();
    assert_eq!(d.answers.len(), 1);
    assert_eq!(
        (d.answers[0].state.as_str(), d.answers[0].last_status),
        ("succeeded", Some(201))
    );
    // Pruning the finished decision takes its answers with it.
    assert_eq!(s.prune(100_000).await, 2);
    assert!(s.show(job.id).await.is_none());
}
