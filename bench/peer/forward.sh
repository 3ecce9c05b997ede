#!/bin/sh
# The do-it-yourself peer: adnanh/webhook runs this per delivery, and it calls P0 with curl.
id=$(printf '%s\n' "$1" | sed -n 's#^/p0 approve \([^ ]*\).*#\1#p' | head -n 1)
exec curl -s -o /dev/null -X POST -H "Authorization: Bearer bench-token" \
  -H 'Content-Type: application/json' -d '{"expirationLength":"2h"}' \
  "$P0_BASE_URL/o/bench/permission-requests/$id/approve"
