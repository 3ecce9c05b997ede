#!/usr/bin/env bash
# Writes the seed corpora (fuzz/seeds/<target>/) from mappings/testdata, the shipped mappings
# and relay.yaml. The seeds are checked in; run this again when the testdata changes.
set -euo pipefail
cd "$(dirname "$0")"
root=..
td=$root/mappings/testdata
rm -rf seeds
mkdir -p seeds/{verify_github,verify_pagerduty,verify_token,verify_hmac,verify_standard_webhooks,verify_basic,body,body_projected,command,mapping_eval,mapping_load,config_load}

# seed TARGET NAME FIRST-BYTES(printf format) HEADER-LINES BODY-FILE
seed() {
  local target=$1 name=$2 prefix=$3 headers=$4 body=$5
  { printf "$prefix"; printf '%s' "$headers"; printf '\n\n'; cat "$body"; } >"seeds/$target/$name"
}

for f in "$td"/github/*.json; do
  n=$(basename "$f" .json)
  event=issue_comment
  case $n in pull_request_review*) event=pull_request_review ;; issues_*) event=issues ;; ping) event=ping ;; esac
  h="X-GitHub-Event: $event
X-GitHub-Delivery: 72d3162e-cc78-11e3-81ab-4c9367dc0958
Content-Type: application/json"
  seed verify_github "$n-signed" '\x01' "$h" "$f"
  seed verify_github "$n-forged" '\x00' "$h
X-Hub-Signature-256: sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17" "$f"
  seed mapping_eval "github-$n" '' "$h" "$f"
done
for f in "$td"/pagerduty/*.json; do
  n=$(basename "$f" .json)
  h="X-Webhook-Id: 8a1d8e6f-2d7c-4a3b-9f43-6f0a9a3b1c2d
X-Webhook-Subscription: PSUB123
Content-Type: application/json"
  seed verify_pagerduty "$n-signed" '\x03' "$h" "$f"
  seed verify_pagerduty "$n-two" '\x00' "$h
X-PagerDuty-Signature: v1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17,v1=00" "$f"
  seed mapping_eval "pagerduty-$n" '' "$h" "$f"
done
for f in "$td"/opsgenie/*.json; do
  n=$(basename "$f" .json)
  seed mapping_eval "opsgenie-$n" '' "Content-Type: application/json" "$f"
done
printf '\x01\n\n' >seeds/verify_token/bearer-signed
printf '\x07\n\n' >seeds/verify_token/relay-token-signed
printf '\x00Authorization: Bearer fuzz-secret-new\n\n' >seeds/verify_token/bearer
printf '\x00X-Relay-Token:  fuzz-secret-old \n\n' >seeds/verify_token/relay-token
printf '\x00Authorization: Basic Zm9vOmJhcg==\n\n' >seeds/verify_token/basic

# The other alerting sources: their testdata for the mapping, projection and verifier targets.
for f in "$td"/{alertmanager,grafana,incidentio,jsm}/*.json; do
  n=$(basename "$(dirname "$f")")-$(basename "$f" .json)
  seed mapping_eval "$n" '' "Content-Type: application/json" "$f"
done
for f in "$td"/grafana/*.json; do
  n=$(basename "$f" .json)
  seed verify_hmac "$n-signed" '\x01' "Content-Type: application/json" "$f"
  seed verify_hmac "$n-timed-base64" '\x0f' "Content-Type: application/json" "$f"
  seed verify_hmac "$n-forged" '\x10' "X-Grafana-Alerting-Signature: sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17" "$f"
done
for f in "$td"/incidentio/*.json; do
  n=$(basename "$f" .json)
  seed verify_standard_webhooks "$n-signed" '\x01' "Content-Type: application/json" "$f"
  seed verify_standard_webhooks "$n-svix" '\x07' "Content-Type: application/json" "$f"
  seed verify_standard_webhooks "$n-forged" '\x00' "webhook-id: msg_1
webhook-timestamp: 1764288000
webhook-signature: v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4= v2,abc" "$f"
done
printf '\x01\n\n' >seeds/verify_basic/signed
printf '\x03\n\n' >seeds/verify_basic/old-password
printf '\x00Authorization: Basic YWxlcnRtYW5hZ2VyOmZ1enotc2VjcmV0LW5ldw==\n\n' >seeds/verify_basic/written
printf '\x00Authorization: Basic YWxlcnRtYW5hZ2VyOmd1ZXNz\n\n' >seeds/verify_basic/wrong
cp seeds/mapping_eval/* seeds/body_projected/

# body: first byte = form flag | depth limit << 1, second = declared length flag | size << 1
for f in "$td"/*/*.json; do
  n=$(basename "$(dirname "$f")")-$(basename "$f" .json)
  { printf '\x80\xff'; cat "$f"; } >"seeds/body/$n"
done
{ printf '\x81\xff'; printf 'payload='; python3 -c 'import sys,urllib.parse;print(urllib.parse.quote_plus(open(sys.argv[1]).read()),end="")' "$td/github/ping.json"; } >seeds/body/github-form
{ printf '\x06\x41'; printf '[[[[{"a":[1]}]]]]'; } >seeds/body/too-deep

# command: the texts people type
printf '/p0 approve req-123 2h' >seeds/command/approve
printf 'LGTM\n/P0 Revoke req-9\r\n/p0 deny  req-8 \n' >seeds/command/several
printf '/p0 approve' >seeds/command/no-id
printf '/p0 grant req-1' >seeds/command/unknown-verb
python3 - "$td" <<'PY'
import json, sys, pathlib
td = pathlib.Path(sys.argv[1])
out = pathlib.Path("seeds/command")
c = json.loads((td / "github/issue_comment_created.json").read_text())
(out / "comment").write_text(c["comment"]["body"])
r = json.loads((td / "github/pull_request_review_approved.json").read_text())
(out / "review").write_text(r["review"]["body"] or "")
PY

for f in "$root"/mappings/*.yaml; do cp "$f" seeds/mapping_load/; done
cp "$root/relay.yaml" seeds/config_load/relay.yaml
cat >seeds/config_load/minimal.yaml <<'YAML'
p0: { org: acme }
YAML
cat >seeds/config_load/full.yaml <<'YAML'
listen: 127.0.0.1:0
mappings: mappings
p0:
  base_url: http://127.0.0.1:4010
  org: ${P0_ORG_ID}
  token: ${P0_API_TOKEN:-}
  timeout: 2s
  rate_per_second: 0
  concurrency: 4
  retry: { base_delay: 10ms, max_delay: 50ms, max_age: 1h, max_attempts: 3 }
decisions: { default_expiration: 1h, max_expiration: 12h }
store: { path: relay.db, dedup_window: 7d, coalesce_window: 10m, store_payloads: true }
inbound:
  rate_per_second: 5
  read_timeout: 2s
  max_connections: 8
  max_json_depth: 32
  networks: { github: [140.82.112.0/20, "::1/128"] }
  client_ip_header: X-Forwarded-For
  tls: { cert: tls/cert.pem, key: tls/key.pem }
metrics: { listen: 127.0.0.1:9090 }
log: { format: json }
YAML
echo "seeds written: $(find seeds -type f | wc -l) files"
