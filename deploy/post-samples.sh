#!/bin/sh
# Posts one sample delivery of every source to a running relay, each signed or authenticated
# the way its provider does it (curl and openssl only), and prints each answer.
#
#   docker compose up --build -d      # the relay, with demo.env, serving every source
#   deploy/post-samples.sh            # or: deploy/post-samples.sh http://relay:8080
#
# Secrets come from demo.env (ENV_FILE=... names another file). Each sample's event time is set
# to now first: grants must be fresh (an hour by default). Run it twice and every source
# answers `duplicate`, which is deduplication at work: GitHub's delivery is keyed by the comment
# and the time it was last edited, PagerDuty's by the event ID, Opsgenie's and JSM's by the
# alert, its action and its time, Alertmanager's and Grafana's by the group; the times this
# script moves are none of those. incident.io's is keyed by its signed `webhook-id`, which the
# script makes new each second: a run a second later answers `accepted`, its decision
# `coalesced` into the first.
set -eu
cd "$(dirname "$0")/.."
BASE=${1:-http://localhost:8080}
# shellcheck disable=SC1090
. "./${ENV_FILE:-demo.env}"
RUN=$(date +%s)
DATA=mappings/testdata
OUT=$(mktemp)
NOW=$(mktemp)
trap 'rm -f "$OUT" "$NOW"' EXIT

fresh() { # FILE: the sample, its event times (occurred_at, created_at, submitted_at) now
    s=$(date -u +%Y-%m-%dT%H:%M:%S)
    sed -E -e "s/\"(occurred_at|created_at|submitted_at)\":\"[0-9:T-]{19}Z\"/\"\\1\":\"${s}Z\"/g" \
        -e "s/\"(occurred_at|created_at|submitted_at)\":\"[0-9:T-]{19}\\.[0-9]{3}Z\"/\"\\1\":\"${s}.000Z\"/g" \
        "$1" >"$NOW"
    echo "$NOW"
}

hmac_hex() { # SECRET FILE: lowercase hex HMAC-SHA256 of the file's bytes
    openssl dgst -sha256 -hmac "$1" <"$2" | sed 's/^.* //'
}

post() { # SOURCE FILE [HEADER]...: posts the file's bytes with the headers, prints the answer
    source=$1 file=$2
    shift 2
    status=$(curl -sS -o "$OUT" -w '%{http_code}' "$BASE/webhooks/$source" \
        -H 'Content-Type: application/json' "$@" --data-binary "@$file")
    printf '%-13s %s %s\n' "$source" "$status" "$(cat "$OUT")"
}

# GitHub: X-Hub-Signature-256, sha256=<hex HMAC of the body>.
f=$(fresh $DATA/github/issue_comment_created.json)
post github "$f" -H 'X-GitHub-Event: issue_comment' -H "X-GitHub-Delivery: sample-$RUN" \
    -H "X-Hub-Signature-256: sha256=$(hmac_hex "$GITHUB_WEBHOOK_SECRET" "$f")"

# PagerDuty: X-PagerDuty-Signature, v1=<hex HMAC of the body>.
f=$(fresh $DATA/pagerduty/incident_acknowledged.json)
post pagerduty "$f" -H "X-Webhook-Id: sample-$RUN" \
    -H "X-PagerDuty-Signature: v1=$(hmac_hex "$PAGERDUTY_WEBHOOK_SECRET" "$f")"

# Opsgenie and Jira Service Management: a shared token in a custom header.
post opsgenie $DATA/opsgenie/acknowledge.json -H "Authorization: Bearer $OPSGENIE_WEBHOOK_TOKEN"
post jsm $DATA/jsm/acknowledge.json -H "X-Relay-Token: $JSM_WEBHOOK_TOKEN"

# Alertmanager: http_config.authorization, a bearer token (basic auth works too).
post alertmanager $DATA/alertmanager/firing.json -H "Authorization: Bearer $ALERTMANAGER_WEBHOOK_TOKEN"

# Grafana: X-Grafana-Alerting-Signature, hex HMAC of the body, no prefix; with a timestamp
# header (GRAFANA_WEBHOOK_TIMESTAMP_HEADER), of "{timestamp}:{body}".
f=$DATA/grafana/firing.json
if [ -n "${GRAFANA_WEBHOOK_TIMESTAMP_HEADER:-}" ]; then
    { printf '%s:' "$RUN"; cat "$f"; } >"$NOW"
    post grafana "$f" -H "$GRAFANA_WEBHOOK_TIMESTAMP_HEADER: $RUN" \
        -H "X-Grafana-Alerting-Signature: $(hmac_hex "$GRAFANA_WEBHOOK_SECRET" "$NOW")"
else
    post grafana "$f" -H "X-Grafana-Alerting-Signature: $(hmac_hex "$GRAFANA_WEBHOOK_SECRET" "$f")"
fi

# incident.io (Standard Webhooks): v1,<base64 HMAC of "{id}.{timestamp}.{body}">, keyed with
# the base64-decoded secret after `whsec_`.
f=$DATA/incidentio/incident_live.json
id="msg_sample_$RUN"
key=$(printf '%s' "${INCIDENTIO_WEBHOOK_SECRET#whsec_}" | openssl base64 -d -A | od -An -v -tx1 | tr -d ' \n')
sig=$({ printf '%s.%s.' "$id" "$RUN"; cat "$f"; } |
    openssl dgst -sha256 -mac HMAC -macopt "hexkey:$key" -binary | openssl base64 -A)
post incidentio "$f" -H "webhook-id: $id" -H "webhook-timestamp: $RUN" -H "webhook-signature: v1,$sig"
