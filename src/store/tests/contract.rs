//! The contract both stores keep, by concern: decisions, subjects, answers back. Each test runs
//! against SQLite and PostgreSQL alike (`on_both_stores!`), through the `Store` interface.

use super::*;

// Decisions: dedup, coalescing, batches, claims and their turn, recovery, replay, outcomes
// under the current claim, a newer schema, on-call checks kept with approves, unreadable rows.

on_both_stores!(dedup_coalescing_and_the_latest_action_rule);
async fn dedup_coalescing_and_the_latest_action_rule(mut s: Backend) {
    let now = 1_000;
    let r = s
        .write(
            &[
                delivery("d1", &[(Action::Approve, "r1"), (Action::Deny, "r2")]),
                delivery("d1", &[(Action::Approve, "r1")]),
                delivery("d2", &[(Action::Approve, "r1")]),
            ],
            &[],
            now,
        )
        .await
        .unwrap();
    let r: Vec<Accepted> = r.into_iter().map(Result::unwrap).collect();
    assert_eq!(jobs(&r[0]), vec![(1, false), (2, false)]);
    assert_eq!(
        r[1],
        Accepted::Duplicate {
            job_ids: vec![1, 2]
        }
    );
    assert_eq!(
        jobs(&r[2]),
        vec![(1, true)],
        "same decision again: coalesced"
    );
    // Once revoked, approving again is a new job, not the old approve.
    let r = s
        .accept(delivery("d3", &[(Action::Revoke, "r1")]), now)
        .await;
    assert_eq!(jobs(&r), vec![(3, false)]);
    let r = s
        .accept(delivery("d4", &[(Action::Approve, "r1")]), now)
        .await;
    assert_eq!(jobs(&r), vec![(4, false)]);
    // A rejected decision does not absorb a later identical one.
    let all = s.claim_due(now, 10).await;
    s.write(&[], &[done(claimed(&all, 2), State::Rejected)], now)
        .await
        .unwrap();
    let r = s.accept(delivery("d5", &[(Action::Deny, "r2")]), now).await;
    assert_eq!(jobs(&r), vec![(5, false)]);
    // Outside the coalescing window, the same decision is sent again.
    let later = now + 601_000;
    let r = s
        .accept(delivery("d6", &[(Action::Approve, "r1")]), later)
        .await;
    assert_eq!(jobs(&r), vec![(6, false)]);
    // Outside the dedup window, the same delivery is new again.
    let much_later = now + 3_601_000;
    let mut again = delivery("d1", &[(Action::Deny, "r9")]);
    again.received_at_ms = much_later;
    let r = s.accept(again, much_later).await;
    assert!(matches!(r, Accepted::New { .. }), "{r:?}");
}

on_both_stores!(a_failing_delivery_is_left_out_whole_and_the_rest_kept);
async fn a_failing_delivery_is_left_out_whole_and_the_rest_kept(mut s: Backend) {
    s.break_request_boom(true).await;
    let r = s
        .write(
            &[
                delivery("ok-1", &[(Action::Approve, "a")]),
                delivery("bad", &[(Action::Approve, "b"), (Action::Approve, "boom")]),
                delivery("ok-2", &[(Action::Revoke, "c")]),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    assert!(
        r[1].as_ref()
            .unwrap_err()
            .to_string()
            .contains("disk says no")
    );
    let listed: Vec<String> = s
        .list(&ListFilter::default())
        .await
        .into_iter()
        .map(|j| j.request_id)
        .collect();
    assert_eq!(
        listed,
        vec!["c", "a"],
        "nothing of the failed delivery was kept"
    );
    // Its dedup key was not taken either: the sender's retry is accepted.
    s.break_request_boom(false).await;
    let retry = s
        .accept(delivery("bad", &[(Action::Approve, "b")]), 1_000)
        .await;
    assert!(matches!(retry, Accepted::New { .. }));
}

on_both_stores!(a_batch_of_distinct_deliveries_dedups_and_coalesces_against_earlier_ones);
/// Batches whose deliveries and requests are all distinct (PostgreSQL writes them set-based,
/// the others one by one) give the same answers: duplicates name the jobs first made, a
/// decision already pending is coalesced, a delivery without decisions is stored with none.
async fn a_batch_of_distinct_deliveries_dedups_and_coalesces_against_earlier_ones(mut s: Backend) {
    let first = s
        .write(
            &[
                delivery("a", &[(Action::Approve, "r1"), (Action::Deny, "r2")]),
                delivery("b", &[(Action::Approve, "r3")]),
            ],
            &[],
            1_000,
        )
        .await
        .unwrap();
    let first: Vec<Accepted> = first.into_iter().map(Result::unwrap).collect();
    assert_eq!(jobs(&first[0]), vec![(1, false), (2, false)]);
    assert_eq!(jobs(&first[1]), vec![(3, false)]);
    let second = s
        .write(
            &[
                delivery("c", &[(Action::Approve, "r1")]),
                delivery("a", &[(Action::Approve, "r9")]),
                delivery("d", &[(Action::Revoke, "r3"), (Action::Approve, "r4")]),
                delivery("e", &[]),
            ],
            &[],
            1_500,
        )
        .await
        .unwrap();
    let second: Vec<Accepted> = second.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        jobs(&second[0]),
        vec![(1, true)],
        "pending approve: coalesced"
    );
    assert_eq!(
        second[1],
        Accepted::Duplicate {
            job_ids: vec![1, 2]
        }
    );
    assert_eq!(jobs(&second[2]), vec![(4, false), (5, false)]);
    assert_eq!(jobs(&second[3]), vec![]);
    assert_eq!(
        s.accept(delivery("e", &[(Action::Approve, "r5")]), 1_600)
            .await,
        Accepted::Duplicate { job_ids: vec![] }
    );
    let claimed = s.claim_due(2_000, 10).await;
    assert_eq!(
        claimed
            .iter()
            .map(|j| (j.id, j.request_id.as_str(), j.action))
            .collect::<Vec<_>>(),
        vec![
            (1, "r1", Action::Approve),
            (2, "r2", Action::Deny),
            (3, "r3", Action::Approve),
            (5, "r4", Action::Approve),
        ],
        "r3's revoke waits for its approve"
    );
}

on_both_stores!(a_replay_never_undoes_a_later_decision);
async fn a_replay_never_undoes_a_later_decision(mut s: Backend) {
    // r1: an approve that died, then a revoke that went through. r2: an approve that died.
    s.accept(delivery("d1", &[(Action::Approve, "r1")]), 1_000)
        .await;
    s.accept(delivery("d2", &[(Action::Approve, "r2")]), 1_000)
        .await;
    let first = s.claim_due(1_000, 10).await;
    let dead: Vec<AttemptRecord> = first.iter().map(|j| done(j, State::Dead)).collect();
    s.write(&[], &dead, 2_000).await.unwrap();
    s.accept(delivery("d3", &[(Action::Revoke, "r1")]), 2_000)
        .await;
    let revoke = s.claim_due(2_000, 10).await;
    assert_eq!(revoke.len(), 1);
    s.write(&[], &[done(&revoke[0], State::Succeeded)], 2_000)
        .await
        .unwrap();
    let (approve_r1, approve_r2, revoke_r1) = (first[0].id, first[1].id, revoke[0].id);
    // Named: r1's approve is left, with the revoke that overtook it.
    assert_eq!(
        s.replay(Replay::One(approve_r1), 3_000).await,
        Replayed {
            queued: vec![],
            overtaken: vec![overtaken(approve_r1, revoke_r1)],
            ended: vec![],
        }
    );
    // All dead: r2's approve goes, r1's stays.
    assert_eq!(
        s.replay(Replay::AllDead, 3_000).await,
        Replayed {
            queued: vec![approve_r2],
            overtaken: vec![overtaken(approve_r1, revoke_r1)],
            ended: vec![],
        }
    );
    let left = s.show(approve_r1).await.unwrap();
    assert_eq!(left.job.state.as_str(), "dead");
    // Pruning keeps the revoke while the approve it overtook is dead, so a later replay still
    // cannot undo it.
    s.prune(1_000_000).await;
    assert!(s.show(revoke_r1).await.is_some(), "the revoke is kept");
    assert_eq!(
        s.replay(Replay::One(approve_r1), 1_000_000).await.overtaken,
        vec![overtaken(approve_r1, revoke_r1)]
    );
    let again = s.claim_due(3_000, 10).await;
    assert_eq!(
        again.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![approve_r2]
    );
}

on_both_stores!(claims_recovery_replay_and_prune);
async fn claims_recovery_replay_and_prune(mut s: Backend) {
    s.accept(
        delivery("d1", &[(Action::Approve, "a"), (Action::Deny, "b")]),
        1_000,
    )
    .await;
    assert_eq!(s.next_due().await, Some(1_000));
    let first = s.claim_due(1_000, 1).await;
    assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(first[0].action, Action::Approve);
    assert_eq!(
        first[0].expiration.as_ref().map(Expiration::as_str),
        Some("1h")
    );
    assert_eq!(
        s.claim_due(1_000, 10).await.len(),
        1,
        "only the unclaimed one is left"
    );
    assert!(s.claim_due(1_000, 10).await.is_empty());
    assert_eq!(
        s.counts().await,
        Counts {
            pending: 2,
            dead: 0
        }
    );
    // A stop while both were in flight: once their claims have run out, both are pending.
    let after_lease = 1_000 + LEASE.as_millis() as i64 + 1;
    assert_eq!(s.recover(after_lease).await, 2);
    let all = s.claim_due(after_lease, 10).await;
    assert_eq!(all.len(), 2);
    s.write(
        &[],
        &[
            done(claimed(&all, 1), State::Succeeded),
            done(claimed(&all, 2), State::Dead),
        ],
        2_000,
    )
    .await
    .unwrap();
    assert_eq!(
        s.counts().await,
        Counts {
            pending: 0,
            dead: 1
        }
    );
    assert_eq!(
        s.replay(Replay::One(1), 3_000).await,
        Replayed::default(),
        "succeeded is not replayable"
    );
    assert_eq!(s.replay(Replay::AllDead, 3_000).await.queued, vec![2]);
    let detail = s.show(2).await.unwrap();
    assert_eq!(
        (detail.job.state.as_str(), detail.job.attempts),
        ("pending", 0)
    );
    assert_eq!(detail.attempts.len(), 1, "history is kept across a replay");
    assert_eq!(detail.delivery.dedup_key, "d1");
    // Prune forgets finished jobs; the pending one and its delivery stay.
    assert_eq!(s.prune(10_000).await, 1);
    assert!(s.show(1).await.is_none());
    assert!(s.show(2).await.is_some());
}

on_both_stores!(a_short_claim_tells_what_falls_due_next_and_what_waits_its_turn);
/// What the worker learns after a claim that took every job due in its turn: when the next
/// one falls due, and which jobs in flight another of their request waits behind (the end of
/// one of those sends the worker back to the store; another call's end does not).
async fn a_short_claim_tells_what_falls_due_next_and_what_waits_its_turn(mut s: Backend) {
    assert!(s.waited_on().await.is_empty(), "an empty store");
    s.accept(delivery("d1", &[(Action::Approve, "a")]), 1_000)
        .await;
    s.accept(delivery("d2", &[(Action::Revoke, "a")]), 1_100)
        .await;
    s.accept(delivery("d3", &[(Action::Approve, "b")]), 1_100)
        .await;
    s.accept(delivery("d4", &[(Action::Approve, "c")]), 5_000)
        .await;
    assert!(
        s.waited_on().await.is_empty(),
        "a's revoke waits for its approve, but that is not in flight"
    );
    let first = s.claim_due(1_200, 10).await;
    assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(
        s.waited_on().await,
        vec![1],
        "a's revoke waits for its approve in flight; nothing waits for b's"
    );
    assert_eq!(s.next_due().await, Some(5_000), "c, in its turn");
    s.write(&[], &[done(claimed(&first, 1), State::Succeeded)], 2_000)
        .await
        .unwrap();
    assert!(s.waited_on().await.is_empty(), "a's approve is done");
    let second = s.claim_due(2_000, 10).await;
    assert_eq!(second.iter().map(|j| j.id).collect::<Vec<_>>(), vec![2]);
    assert!(
        s.waited_on().await.is_empty(),
        "a's revoke is in flight; nothing waits behind it"
    );
    // A follower counts whether or not it is due yet: another decision on b, accepted later,
    // with b's approve still in flight.
    s.accept(delivery("d5", &[(Action::Revoke, "b")]), 9_000)
        .await;
    assert_eq!(s.waited_on().await, vec![3]);
}

on_both_stores!(an_outcome_counts_only_from_the_current_claim);
async fn an_outcome_counts_only_from_the_current_claim(mut s: Backend) {
    s.accept(delivery("d1", &[(Action::Approve, "a")]), 1_000)
        .await;
    let old = s.claim_due(1_000, 1).await.remove(0);
    // The claim runs out (on SQLite: the relay stopped), and the job is claimed again.
    let later = 1_000 + LEASE.as_millis() as i64 + 1;
    assert_eq!(s.recover(later).await, 1);
    let new = s.claim_due(later, 1).await.remove(0);
    assert_eq!(new.id, old.id);
    assert_ne!(
        new.claim_token, old.claim_token,
        "a new claim has a new token"
    );
    // The late outcome of the old claim is ignored...
    s.write(&[], &[done(&old, State::Dead)], later)
        .await
        .unwrap();
    let d = s.show(old.id).await.unwrap();
    assert_eq!(d.job.state, "sending");
    assert!(d.attempts.is_empty());
    // ...the current claim's is recorded.
    s.write(&[], &[done(&new, State::Succeeded)], later)
        .await
        .unwrap();
    let d = s.show(old.id).await.unwrap();
    assert_eq!((d.job.state.as_str(), d.attempts.len()), ("succeeded", 1));
    // A second record from the same claim changes nothing either.
    s.write(&[], &[done(&new, State::Dead)], later)
        .await
        .unwrap();
    assert_eq!(s.show(old.id).await.unwrap().job.state, "succeeded");
}

on_both_stores!(a_newer_schema_is_refused);
async fn a_newer_schema_is_refused(s: Backend) {
    let err = s.reopen_after_a_newer_relay().await.err().unwrap();
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

/// A delivery whose approves must pass `gate` (a PagerDuty check of `user`).
fn gated(key: &str, decisions: &[(Action, &str)], user: &str) -> NewDelivery {
    let mut d = on_subject(key, decisions, "P1", false);
    d.binding.gate = Some(Box::new(crate::domain::Gate::PagerDuty {
        user: user.into(),
        escalation_policy: Some("PEP1".into()),
        incident: None,
        escalation_policies: vec!["PEP1".into()],
        max_level: Some(2),
        schedules: Vec::new(),
        at_ms: 1_000,
    }));
    d
}

on_both_stores!(an_on_call_check_is_stored_with_its_approve_and_its_evidence_recorded);
/// A gated approve carries its check to the worker (a revoke beside it carries none); it
/// coalesces only with an approve under the same check, alone or in a batch; the evidence a
/// record brings stays through later records without any, and a replay clears it, so the
/// decision is checked again.
async fn an_on_call_check_is_stored_with_its_approve_and_its_evidence_recorded(mut s: Backend) {
    let first = s
        .accept(
            gated(
                "g1",
                &[(Action::Approve, "r1"), (Action::Revoke, "r9")],
                "PU1",
            ),
            1_000,
        )
        .await;
    // Another check of the same request is a decision of its own; the same check coalesces,
    // one at a time and within a batch.
    let other = s
        .accept(gated("g2", &[(Action::Approve, "r1")], "PU2"), 1_001)
        .await;
    assert!(!jobs(&other)[0].1, "a different check is not coalesced");
    let batch = s
        .write(
            &[
                gated("g3", &[(Action::Approve, "r1")], "PU2"),
                gated("g4", &[(Action::Approve, "r2")], "PU1"),
                gated("g5", &[(Action::Approve, "r2")], "PU1"),
            ],
            &[],
            1_002,
        )
        .await
        .unwrap();
    let batch: Vec<Accepted> = batch.into_iter().map(Result::unwrap).collect();
    assert_eq!(jobs(&batch[0]), vec![(jobs(&other)[0].0, true)]);
    assert!(!jobs(&batch[1])[0].1);
    assert_eq!(jobs(&batch[2]), vec![(jobs(&batch[1])[0].0, true)]);

    let (approve, revoke) = (jobs(&first)[0].0, jobs(&first)[1].0);
    let due = s.claim_due(2_000, 10).await;
    let job = claimed(&due, approve).clone();
    let gate: crate::domain::Gate = job.gate.clone().unwrap().unwrap();
    assert!(
        matches!(&gate, crate::domain::Gate::PagerDuty { user, max_level: Some(2), .. } if user == "PU1")
    );
    assert_eq!(job.evidence, None, "not checked yet");
    assert_eq!(
        claimed(&due, revoke).gate,
        Ok(None),
        "ending access is never gated"
    );

    // Checked and sent, P0 failing: retried with the evidence, which no later record erases.
    // (On r2, whose latest decision it stays: r1's first approve was overtaken by PU2's.)
    let approve = jobs(&batch[1])[0].0;
    let job = claimed(&due, approve).clone();
    let mut rec = done(&job, State::Pending);
    rec.evidence = Some("on call: escalation policy PEP1 level 1".into());
    s.write(&[], &[rec], 2_000).await.unwrap();
    let detail = s.show(approve).await.unwrap();
    assert_eq!(
        detail.evidence.as_deref(),
        Some("on call: escalation policy PEP1 level 1")
    );
    assert!(detail.gate.is_some());
    let again = s.claim_due(3_000, 10).await;
    let job = claimed(&again, approve).clone();
    assert_eq!(
        job.evidence.as_deref(),
        Some("on call: escalation policy PEP1 level 1")
    );
    s.write(&[], &[done(&job, State::Dead)], 3_000)
        .await
        .unwrap();
    assert!(s.show(approve).await.unwrap().evidence.is_some());

    // Replayed, it is checked again.
    let replayed = s.replay(Replay::One(approve), 4_000).await;
    assert_eq!(replayed.queued, vec![approve]);
    let detail = s.show(approve).await.unwrap();
    assert_eq!((detail.evidence, detail.gate.is_some()), (None, true));
}

on_both_stores!(a_row_changed_behind_the_relays_back_is_claimed_as_unreadable);
/// A claimed row holding a value the relay never writes (an unknown action) comes back apart,
/// saying what is wrong, under its claim (so the worker records it dead); the rows beside it
/// are claimed as usual.
async fn a_row_changed_behind_the_relays_back_is_claimed_as_unreadable(mut s: Backend) {
    s.accept(
        delivery("d1", &[(Action::Approve, "a"), (Action::Approve, "b")]),
        1_000,
    )
    .await;
    s.behind_its_back("UPDATE jobs SET action = 'grant' WHERE request_id = 'a'")
        .await;
    let claimed = s.claim(2_000, 10).await;
    assert_eq!(
        claimed
            .items
            .iter()
            .map(|j| j.request_id.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(claimed.unreadable.len(), 1);
    let row = &claimed.unreadable[0];
    assert_eq!((row.id, row.attempts), (1, 0));
    assert!(row.why.contains("unknown action `grant`"), "{}", row.why);
    // Its outcome is recorded under the claim it came with.
    let mut dead = done(&claimed.items[0], State::Dead);
    dead.settled.id = row.id;
    dead.settled.claim_token = row.claim_token;
    s.write(&[], &[dead], 2_000).await.unwrap();
    assert_eq!(s.show(row.id).await.unwrap().job.state, "dead");
}

on_both_stores!(what_only_an_approve_needs_never_holds_back_a_revoke);
/// A revoke whose reply and on-call check were garbled is still claimed to be sent (with no
/// answer back); an approve whose check was garbled comes with why, to be refused.
async fn what_only_an_approve_needs_never_holds_back_a_revoke(mut s: Backend) {
    s.accept(
        on_subject(
            "d1",
            &[(Action::Revoke, "r"), (Action::Approve, "a")],
            "P1",
            false,
        ),
        1_000,
    )
    .await;
    s.behind_its_back("UPDATE jobs SET reply = '{\"via\":\"carrier-pigeon\"}', gate = 'nope'")
        .await;
    let claimed = s.claim(2_000, 10).await;
    assert!(claimed.unreadable.is_empty(), "{:?}", claimed.unreadable);
    let [revoke, approve] = &claimed.items[..] else {
        panic!("two jobs claimed: {:?}", claimed.items);
    };
    assert_eq!(
        (revoke.action, revoke.reply.is_none()),
        (Action::Revoke, true)
    );
    assert_eq!(revoke.gate, Ok(None));
    assert_eq!(approve.action, Action::Approve);
    assert!(
        approve
            .gate
            .as_ref()
            .is_err_and(|why| why.contains("on-call check")),
        "{:?}",
        approve.gate
    );
}

// Subjects: an end revokes what was granted under it (in order, in the same batch), refuses
// approves until a reopening, and is pruned only when nothing could be replayed under it.

on_both_stores!(a_subject_end_revokes_what_was_granted_under_it_in_order);
async fn a_subject_end_revokes_what_was_granted_under_it_in_order(mut s: Backend) {
    // Long on purpose: one subject's life, from approves to its end's revokes, read in order.
    for (key, id, subject) in [
        ("d1", "a", "P1"),
        ("d2", "b", "P1"),
        ("d3", "c", "P1"),
        ("d4", "x", "P2"),
    ] {
        s.approve_on(key, id, subject, 1_000).await;
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
    refused.settled.status = Some(400);
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

on_both_stores!(an_end_sees_the_approve_it_shares_a_batch_with);
/// An approve and the end of its subject committed in one batch (they arrived within one
/// group commit, the approve first): the end revokes it, whatever their dedup keys.
async fn an_end_sees_the_approve_it_shares_a_batch_with(mut s: Backend) {
    let revoked = revoked_in_one_batch(&mut s, ("z-approve", "a-end"), "late", "P9", false).await;
    assert_eq!(revoked, ["late"]);
}

/// What an end revokes when it is written in one batch with an approve of `request` under
/// its subject, the end first or last in the batch (keys: the approve's, the end's).
async fn revoked_in_one_batch(
    s: &mut Backend,
    (approve_key, end_key): (&str, &str),
    request: &str,
    subject: &str,
    end_first: bool,
) -> Vec<String> {
    let approve = on_subject(approve_key, &[(Action::Approve, request)], subject, false);
    let end = on_subject(end_key, &[], subject, true);
    let batch = match end_first {
        true => [end, approve],
        false => [approve, end],
    };
    let r = s.write(&batch, &[], 1_000).await.unwrap();
    let end = r[usize::from(!end_first)].as_ref().unwrap();
    bound(end).into_iter().map(|b| b.0).collect()
}

on_both_stores!(an_end_that_arrived_first_still_sees_the_approve_in_its_batch);
/// The same, the end arriving first: within one batch, ends are written after every other
/// delivery (`batch_order`) on both stores.
async fn an_end_that_arrived_first_still_sees_the_approve_in_its_batch(mut s: Backend) {
    let keys = ("approve-second", "end-first");
    let revoked = revoked_in_one_batch(&mut s, keys, "r-8", "P8", true).await;
    assert_eq!(revoked, ["r-8"]);
}

on_both_stores!(a_decision_on_another_subject_is_not_coalesced_into_this_ones);
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

on_both_stores!(an_ended_subject_refuses_approves_until_it_reopens);
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

on_both_stores!(replay_refuses_an_approve_whose_subject_ended_after_it);
/// A dead approve, then its subject's end (nothing granted, so nothing revoked): replaying
/// the approve is refused with the reason, alone or with every dead letter; after a reopening
/// it still is (it was asked before the end: ask again).
async fn replay_refuses_an_approve_whose_subject_ended_after_it(mut s: Backend) {
    s.approve_on("d1", "r1", "P1", 1_000).await;
    s.approve_on("d2", "r2", "P2", 1_000).await;
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

on_both_stores!(ends_are_pruned_only_when_nothing_could_be_replayed_under_them);
/// Subject ends older than their window go, unless a dead approve under the subject could
/// still be replayed: then the end stays to refuse it.
async fn ends_are_pruned_only_when_nothing_could_be_replayed_under_them(mut s: Backend) {
    s.approve_on("p1", "r1", "P1", 1_000).await;
    let job = s.claim_due(1_000, 1).await.remove(0);
    s.write(&[], &[done(&job, State::Dead)], 1_100)
        .await
        .unwrap();
    s.accept(on_subject("p2", &[], "P1", true), 2_000).await;
    s.accept(on_subject("p3", &[], "P2", true), 2_000).await;
    s.prune_with(Prune {
        audit_before_ms: 0,
        audit_key: None,
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

on_both_stores!(what_is_still_granted_is_what_an_end_revokes);
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
        s.approve_on(key, id, subject, 1_000).await;
    }
    let all = s.claim_due(1_000, 10).await;
    let mut rejected = done(claimed(&all, 2), State::Rejected);
    rejected.settled.status = Some(400);
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

// Answers back: created with the final outcome, claimed once, recorded only under the
// current claim, pruned with their decision.

on_both_stores!(an_answer_claim_takes_no_more_than_its_limit);
/// Answers due and answers whose claim has lapsed are claimed together, up to the limit the
/// loop asked for (it has that many free places: one more would wait unsent while its claim
/// lapsed, and could be sent twice).
async fn an_answer_claim_takes_no_more_than_its_limit(mut s: Backend) {
    for (i, request) in ["a", "b", "c", "d"].into_iter().enumerate() {
        s.approve_on(&format!("d{i}"), request, "P1", 1_000).await;
    }
    let jobs = s.claim_due(1_000, 10).await;
    let (first, later) = jobs.split_at(2);
    let notes = |jobs: &[Job]| {
        jobs.iter()
            .map(|j| with_a_note(done(j, State::Succeeded)))
            .collect::<Vec<_>>()
    };
    s.write(&[], &notes(first), 2_000).await.unwrap();
    assert_eq!(s.claim_answers(2_000, 10).await.len(), 2);
    s.write(&[], &notes(later), 3_000).await.unwrap();
    // Two due, and on PostgreSQL two whose claim has lapsed (a relay stopped while sending
    // them; a SQLite store gives those back as it starts).
    let lapsed = 2_000 + LEASE.as_millis() as i64 + 1;
    assert_eq!(s.claim_answers(lapsed, 2).await.len(), 2);
}

on_both_stores!(answers_are_created_with_the_final_outcome_and_claimed_once);
async fn answers_are_created_with_the_final_outcome_and_claimed_once(mut s: Backend) {
    s.approve_on("d1", "a", "P1", 1_000).await;
    let job = s.claim_due(1_000, 1).await.remove(0);
    s.write(&[], &[with_a_note(done(&job, State::Succeeded))], 2_000)
        .await
        .unwrap();
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
        audit: Vec::new(),
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
