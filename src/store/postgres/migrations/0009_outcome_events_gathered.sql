-- p0_relay_write gathers the audit events of the outcomes it records in one statement, in
-- job order as before (they were appended one outcome at a time, copying the growing list
-- each time). No table changes: the version says which relays know the function's body.
SELECT 1;
