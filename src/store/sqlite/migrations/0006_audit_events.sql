-- The audit trail (store::audit): one row per event, numbered in commit order (one past the
-- last: one writer), its body the event as JSON and its digest over the ID, time, event name
-- and body. Seals are events too; they are found by the partial index.
CREATE TABLE audit_events (
    id     INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,
    event  TEXT NOT NULL,
    body   TEXT NOT NULL,
    digest BLOB NOT NULL
);
CREATE INDEX audit_seals ON audit_events (id) WHERE event = 'seal';
