//! The contract for subjects: an end revokes what was granted under it (in order, in the same
//! batch), refuses approves until a reopening, and is pruned only when nothing could be
//! replayed under it; what is still granted reads the same as an end finds it.

use super::*;

contract!(a_subject_end_revokes_what_was_granted_under_it_in_order);
async fn a_subject_end_revokes_what_was_granted_under_it_in_order(mut s: Backend) {
    // Long on purpose: one subject's life, from approves to its end's revokes, read in order.
    for (key, id, subject) in [
        ("d1", "a", "P1"),
        ("d2", "b", "P1"),
        ("d3", "c", "P1"),
        ("d4", "x", "P2"),
    ] {
        s.accept(
            on_subject(key, &[(Action::Approve, id)], subject, false),
            1_000,
        )
        .await;
    }
    let all = s.claim_due(1_000, 10).await;
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].subject.as_deref(), Some("P1"));
    assert_eq!(
        all[0]
            .reply
            .as_ref()
            .map(|r| serde_json::to_string(r).unwrap())
            .as_deref(),
        Some(r#"{"via":"pagerduty"}"#),
        "the reply target is stored with the decision"
    );
    // a: P0 approved; b: P0 refused; c: still on its way to P0.
    let mut refused = done(claimed(&all, 2), State::Rejected);
    refused.status = Some(400);
    s.write(
        &[],
        &[done(claimed(&all, 1), State::Succeeded), refused],
        2_000,
    )
    .await
    .unwrap();
    let end = s.accept(on_subject("d5", &[], "P1", true), 3_000).await;
    let revoked = bound(&end);
    assert_eq!(
        revoked.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
        vec!["a", "c"],
        "the refused request is not revoked; the one still in flight is"
    );
    let detail = s.show(revoked[0].1).await.unwrap();
    assert_eq!(
        (detail.job.action.as_str(), detail.job.subject.as_deref()),
        ("revoke", Some("P1"))
    );
    assert!(detail.job.ended_by.is_some());
    // The revoke of `c` waits for its approve; the revoke of `a` goes now.
    let next = s.claim_due(3_000, 10).await;
    assert_eq!(
        next.iter()
            .map(|j| (j.request_id.as_str(), j.action, j.bound))
            .collect::<Vec<_>>(),
        vec![("a", Action::Revoke, true)]
    );
    assert_eq!(s.next_due().await, None, "nothing else can go yet");
    s.write(&[], &[done(claimed(&all, 3), State::Succeeded)], 4_000)
        .await
        .unwrap();
    let next = s.claim_due(4_000, 10).await;
    assert_eq!(
        next.iter()
            .map(|j| (j.request_id.as_str(), j.action))
            .collect::<Vec<_>>(),
        vec![("c", Action::Revoke)]
    );
    // Ending it again revokes nothing more; the other subject is untouched.
    let again = s.accept(on_subject("d6", &[], "P1", true), 5_000).await;
    assert!(bound(&again).is_empty());
    let p2 = s
        .list(&ListFilter {
            subject: Some("P2".into()),
            ..ListFilter::default()
        })
        .await;
    assert_eq!(
        p2.iter().map(|j| j.request_id.as_str()).collect::<Vec<_>>(),
        vec!["x"]
    );
}
contract!(an_end_sees_the_approve_it_shares_a_batch_with);
/// An approve and the end of its subject committed in one batch (they arrived within one
/// group commit, the approve first): the end revokes it, whatever their dedup keys.
async fn an_end_sees_the_approve_it_shares_a_batch_with(mut s: Backend) {
    let r = s
        .write(
            &[
                on_subject("z-approve", &[(Action::Approve, "late")], "P9", false),
                on_subject("a-end", &[], "P9", true),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    let end = r[1].as_ref().unwrap();
    assert_eq!(
        bound(end).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["late"]
    );
}
contract!(an_end_that_arrived_first_still_sees_the_approve_in_its_batch);
/// The same, the end arriving first: within one batch, ends are written after every other
/// delivery (`batch_order`) on both stores.
async fn an_end_that_arrived_first_still_sees_the_approve_in_its_batch(mut s: Backend) {
    let r = s
        .write(
            &[
                on_subject("end-first", &[], "P8", true),
                on_subject("approve-second", &[(Action::Approve, "r-8")], "P8", false),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    let end = r[0].as_ref().unwrap();
    assert_eq!(
        bound(end).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["r-8"]
    );
}
contract!(a_decision_on_another_subject_is_not_coalesced_into_this_ones);
/// Two alerts name the same request: each approve is a job bound to its alert, so the first
/// alert's end does not take the access the second one still justifies.
async fn a_decision_on_another_subject_is_not_coalesced_into_this_ones(mut s: Backend) {
    let first = s
        .accept(
            on_subject("f1", &[(Action::Approve, "shared")], "F1", false),
            1_000,
        )
        .await;
    let second = s
        .accept(
            on_subject("f2", &[(Action::Approve, "shared")], "F2", false),
            1_001,
        )
        .await;
    assert!(!jobs(&second)[0].1, "not coalesced across subjects");
    assert_ne!(jobs(&first)[0].0, jobs(&second)[0].0);
    let end_f1 = s.accept(on_subject("f1-end", &[], "F1", true), 2_000).await;
    assert!(
        bound(&end_f1).is_empty(),
        "F2 still justifies the request: F1's end leaves it"
    );
    let end_f2 = s.accept(on_subject("f2-end", &[], "F2", true), 3_000).await;
    assert_eq!(
        bound(&end_f2).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["shared"]
    );
    // The same subject still coalesces.
    let again = s
        .accept(
            on_subject("f3", &[(Action::Approve, "other")], "F3", false),
            4_000,
        )
        .await;
    let same = s
        .accept(
            on_subject("f3-again", &[(Action::Approve, "other")], "F3", false),
            4_001,
        )
        .await;
    assert_eq!(jobs(&same), vec![(jobs(&again)[0].0, true)]);
}
fn refusal(a: &Accepted) -> Option<&str> {
    match a {
        Accepted::New { refused, .. } => refused.as_deref(),
        Accepted::Duplicate { .. } => panic!("duplicate"),
    }
}
fn reopened(a: &Accepted) -> bool {
    match a {
        Accepted::New { reopened, .. } => *reopened,
        Accepted::Duplicate { .. } => panic!("duplicate"),
    }
}
/// A delivery on `subject` that reopens it.
fn reopening(key: &str, decisions: &[(Action, &str)], subject: &str) -> NewDelivery {
    let mut d = on_subject(key, decisions, subject, false);
    d.binding.reopens_subject = true;
    d
}
contract!(an_ended_subject_refuses_approves_until_it_reopens);
/// After its end, a subject's approves are stored refused (never coalesced into a live job,
/// never revoked by a later end), its denies and revokes with them; a reopening takes them
/// again. The reason is the same on both stores.
async fn an_ended_subject_refuses_approves_until_it_reopens(mut s: Backend) {
    s.accept(on_subject("e1", &[], "P1", true), 1_000).await;
    let want = ended_reason("P1", 1_000);
    assert_eq!(want, "subject P1 ended at 1970-01-01T00:00:01Z");
    let late = s
        .accept(
            on_subject(
                "e2",
                &[(Action::Approve, "r1"), (Action::Revoke, "r2")],
                "P1",
                false,
            ),
            2_000,
        )
        .await;
    assert_eq!(refusal(&late), Some(want.as_str()));
    let ids: Vec<i64> = jobs(&late).iter().map(|j| j.0).collect();
    assert_eq!(ids.len(), 2);
    // Stored to be answered back, each with the reason; not coalesced with each other or
    // anything after.
    let claimed = s.claim_due(2_000, 10).await;
    assert_eq!(
        claimed
            .iter()
            .map(|j| (j.id, j.refused.as_deref()))
            .collect::<Vec<_>>(),
        vec![(ids[0], Some(want.as_str())), (ids[1], Some(want.as_str()))]
    );
    s.write(
        &[],
        &claimed
            .iter()
            .map(|j| done(j, State::Rejected))
            .collect::<Vec<_>>(),
        2_100,
    )
    .await
    .unwrap();
    // Another subject is untouched.
    let other = s
        .accept(
            on_subject("e3", &[(Action::Approve, "r1")], "P2", false),
            2_200,
        )
        .await;
    assert_eq!(refusal(&other), None);
    // Ending it again: the refused approve is not revoked (it never reached P0).
    let again = s.accept(on_subject("e4", &[], "P1", true), 3_000).await;
    assert!(bound(&again).is_empty());
    // A reopening: approves are taken again, and a later end revokes them.
    let back = s.accept(reopening("e5", &[], "P1"), 4_000).await;
    assert!(reopened(&back));
    assert_eq!(refusal(&back), None);
    let taken = s
        .accept(
            on_subject("e6", &[(Action::Approve, "r3")], "P1", false),
            5_000,
        )
        .await;
    assert_eq!(refusal(&taken), None);
    let end = s.accept(on_subject("e7", &[], "P1", true), 6_000).await;
    assert_eq!(
        bound(&end).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["r3"]
    );
    // A reopening that carries its own approve is taken at once; one on a subject that never
    // ended reopens nothing.
    let both = s
        .accept(reopening("e8", &[(Action::Approve, "r4")], "P1"), 7_000)
        .await;
    assert!(reopened(&both));
    assert_eq!(refusal(&both), None);
    let never = s.accept(reopening("e9", &[], "P3"), 7_000).await;
    assert!(!reopened(&never));
}
contract!(replay_refuses_an_approve_whose_subject_ended_after_it);
/// A dead approve, then its subject's end (nothing granted, so nothing revoked): replaying
/// the approve is refused with the reason, alone or with every dead letter; after a reopening
/// it still is (it was asked before the end: ask again).
async fn replay_refuses_an_approve_whose_subject_ended_after_it(mut s: Backend) {
    s.accept(
        on_subject("d1", &[(Action::Approve, "r1")], "P1", false),
        1_000,
    )
    .await;
    s.accept(
        on_subject("d2", &[(Action::Approve, "r2")], "P2", false),
        1_000,
    )
    .await;
    let first = s.claim_due(1_000, 10).await;
    let dead: Vec<AttemptRecord> = first.iter().map(|j| done(j, State::Dead)).collect();
    s.write(&[], &dead, 2_000).await.unwrap();
    let end = s.accept(on_subject("d3", &[], "P1", true), 3_000).await;
    assert!(bound(&end).is_empty(), "a dead approve granted nothing");
    let (r1, r2) = (first[0].id, first[1].id);
    let reason = ended_reason("P1", 3_000);
    assert_eq!(
        s.replay(Replay::One(r1), 4_000).await,
        Replayed {
            queued: vec![],
            overtaken: vec![],
            ended: vec![(r1, reason.clone())],
        }
    );
    assert_eq!(
        s.replay(Replay::AllDead, 4_000).await,
        Replayed {
            queued: vec![r2],
            overtaken: vec![],
            ended: vec![(r1, reason.clone())],
        }
    );
    s.accept(reopening("d4", &[], "P1"), 5_000).await;
    let after = s.replay(Replay::One(r1), 6_000).await;
    assert_eq!(after.queued, Vec::<i64>::new());
    assert_eq!(after.ended.len(), 1);
    assert!(after.ended[0].1.starts_with(&reason), "{:?}", after.ended);
    assert!(
        after.ended[0].1.contains("reopened since"),
        "{:?}",
        after.ended
    );
    let again = s.claim_due(6_000, 10).await;
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), vec![r2]);
}
contract!(ends_are_pruned_only_when_nothing_could_be_replayed_under_them);
/// Subject ends older than their window go, unless a dead approve under the subject could
/// still be replayed: then the end stays to refuse it.
async fn ends_are_pruned_only_when_nothing_could_be_replayed_under_them(mut s: Backend) {
    s.accept(
        on_subject("p1", &[(Action::Approve, "r1")], "P1", false),
        1_000,
    )
    .await;
    let job = s.claim_due(1_000, 1).await.remove(0);
    s.write(&[], &[done(&job, State::Dead)], 1_100)
        .await
        .unwrap();
    s.accept(on_subject("p2", &[], "P1", true), 2_000).await;
    s.accept(on_subject("p3", &[], "P2", true), 2_000).await;
    s.prune_with(Prune {
        finished_before_ms: 0,
        ends_before_ms: 10_000,
    })
    .await;
    // P2's end is gone: an approve under it is taken again.
    let p2 = s
        .accept(
            on_subject("p4", &[(Action::Approve, "r2")], "P2", false),
            11_000,
        )
        .await;
    assert_eq!(refusal(&p2), None);
    // P1's stays while its dead approve could be replayed.
    let p1 = s
        .accept(
            on_subject("p5", &[(Action::Approve, "r3")], "P1", false),
            11_000,
        )
        .await;
    assert_eq!(refusal(&p1), Some(ended_reason("P1", 2_000).as_str()));
    assert_eq!(s.replay(Replay::One(job.id), 12_000).await.ended.len(), 1);
}

contract!(what_is_still_granted_is_what_an_end_revokes);
/// What `explain` reads as still granted under a subject is what its end then revokes: an
/// approve pending or done, not one refused by P0, overtaken by a revoke, stored refused, or
/// granted under another subject.
async fn what_is_still_granted_is_what_an_end_revokes(mut s: Backend) {
    for (key, id, subject) in [
        ("g1", "done", "P1"),
        ("g2", "refused-by-p0", "P1"),
        ("g3", "pending", "P1"),
        ("g4", "revoked", "P1"),
        ("g5", "elsewhere", "P2"),
    ] {
        s.accept(
            on_subject(key, &[(Action::Approve, id)], subject, false),
            1_000,
        )
        .await;
    }
    let all = s.claim_due(1_000, 10).await;
    let mut rejected = done(claimed(&all, 2), State::Rejected);
    rejected.status = Some(400);
    s.write(
        &[],
        &[done(claimed(&all, 1), State::Succeeded), rejected],
        2_000,
    )
    .await
    .unwrap();
    s.accept(delivery("g6", &[(Action::Revoke, "revoked")]), 2_000)
        .await;
    let mut stale = on_subject("g7", &[(Action::Approve, "stale")], "P1", false);
    stale.refused = Some("too old".into());
    s.accept(stale, 2_000).await;
    let granted = s.still_granted("github", "P1").await;
    assert_eq!(
        granted
            .iter()
            .map(|g| (g.request_id.as_str(), g.state.as_str()))
            .collect::<Vec<_>>(),
        [("done", "succeeded"), ("pending", "sending")]
    );
    let end = s.accept(on_subject("g8", &[], "P1", true), 3_000).await;
    assert_eq!(
        bound(&end).into_iter().map(|b| b.0).collect::<Vec<_>>(),
        granted
            .iter()
            .map(|g| g.request_id.clone())
            .collect::<Vec<_>>()
    );
    assert!(s.still_granted("github", "P1").await.is_empty(), "revoked");
}
