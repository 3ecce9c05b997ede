-- The audit trail (store::audit): one row per event, its ID handed out from audit_head by
-- p0_relay_audit, whose row lock is held until the writing transaction commits, so IDs follow
-- commit order without gaps across relays; its body the event as JSON and its digest over
-- the ID, time, event name and body. Seals are events too, found by the partial index.
-- p0_relay_write takes the events of its batch (a new argument); the previous release's
-- six-argument call writes through it with none of its own.
CREATE TABLE audit_events (
    id     BIGINT PRIMARY KEY,
    at     BIGINT NOT NULL,
    event  TEXT NOT NULL,
    body   TEXT NOT NULL,
    digest BYTEA NOT NULL
);
CREATE INDEX audit_seals ON audit_events (id) WHERE event = 'seal';
CREATE TABLE audit_head (
    one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    last_id BIGINT NOT NULL
);
INSERT INTO audit_head (one, last_id) VALUES (true, 0);
