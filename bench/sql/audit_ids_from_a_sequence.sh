#!/usr/bin/env bash
# Prints a variant of the store's p0_relay_audit_text for bench/pg_variant.sh, for measurement
# only: event IDs from a sequence under a shared advisory lock, instead of audit_head's row
# lock held to commit (BENCHMARKS, 2026-12-08). Only the writers change: readers, seals and
# `audit verify` still expect IDs without gaps, so a database written through it is for storms.
#
#   bench/sql/audit_ids_from_a_sequence.sh >/tmp/seq.sql && bench/pg_variant.sh BINARY /tmp/seq.sql
#
# Made from the checkout's function, so it follows it; it stops if the lines it changes moved.
set -euo pipefail
fn="$(dirname "$0")/../../src/store/postgres/functions/p0_relay_audit_text.sql"
# Far above any ID written before the variant is applied (a seal, say).
echo "CREATE SEQUENCE IF NOT EXISTS audit_seq_bench START 1000000;"
perl -0pe '
  s/UPDATE audit_head SET last_id = last_id \+ n RETURNING last_id - n INTO first_id;/PERFORM pg_advisory_xact_lock_shared(4242);/ or die "the audit_head update moved\n";
  s/FROM \(SELECT first_id \+ u\.i AS id, u\.name,\s*\x27\{"id":\x27 \|\| \(first_id \+ u\.i\) \|\| head \|\| u\.tail AS body\s*FROM unnest\(names, tails\) WITH ORDINALITY AS u\(name, tail, i\)\) b/FROM (SELECT q.id, q.name, \x27{"id":\x27 || q.id || head || q.tail AS body\n              FROM (SELECT nextval(\x27audit_seq_bench\x27) AS id, u.name, u.tail\n                    FROM unnest(names, tails) WITH ORDINALITY AS u(name, tail, i) OFFSET 0) q) b/ or die "the numbering of the rows moved\n";
' "$fn"
