-- p0_relay_write gathers the audit events of the outcomes it records in one statement, in
-- job order as before, of the records applied only (they were appended one outcome at a
-- time, copying the growing list each time), and p0_relay_audit writes an event that comes without nulls as its text, with
-- its ID and time first (rebuilding it as JSONB cost more than the rest of the write). No
-- table changes: the version says which relays know the functions' bodies.
SELECT 1;
