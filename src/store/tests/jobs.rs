//! The contract for decisions: dedup, coalescing, batches, claims and their turn, recovery,
//! replay, outcomes under the current claim, a newer schema, on-call checks kept with approves,
//! unreadable rows.

use super::*;

contract!(dedup_coalescing_and_the_latest_action_rule);
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
contract!(a_failing_delivery_is_left_out_whole_and_the_rest_kept);
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
contract!(a_batch_of_distinct_deliveries_dedups_and_coalesces_against_earlier_ones);
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
contract!(a_replay_never_undoes_a_later_decision);
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
contract!(claims_recovery_replay_and_prune);
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
contract!(a_short_claim_tells_what_falls_due_next_and_what_waits_its_turn);
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
contract!(an_outcome_counts_only_from_the_current_claim);
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
contract!(a_newer_schema_is_refused);
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
contract!(an_on_call_check_is_stored_with_its_approve_and_its_evidence_recorded);
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
    let gate: crate::domain::Gate = job.gate.clone().unwrap();
    assert!(
        matches!(&gate, crate::domain::Gate::PagerDuty { user, max_level: Some(2), .. } if user == "PU1")
    );
    assert_eq!(job.evidence, None, "not checked yet");
    assert_eq!(
        claimed(&due, revoke).gate,
        None,
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

contract!(a_row_changed_behind_the_relays_back_is_claimed_as_unreadable);
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
    dead.job_id = row.id;
    dead.claim_token = row.claim_token;
    s.write(&[], &[dead], 2_000).await.unwrap();
    assert_eq!(s.show(row.id).await.unwrap().job.state, "dead");
}
