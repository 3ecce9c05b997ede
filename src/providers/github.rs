//! GitHub: its auth (a bearer token, its media type and API version), where an answer goes
//! (a reaction on the comment that asked, or a comment on the issue), and its check (an
//! active member of one of the pinned organization's teams).

use reqwest::header::{self, HeaderMap, HeaderValue};

use super::secret;

use super::Place;
use crate::config::ProviderApi;
use crate::domain::{Gate, Via, org_teams, printable};
use crate::oncall::{Checker, Fetched, Finding, failure};

/// What every call to GitHub carries.
pub fn headers(api: &ProviderApi) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        secret(&format!("Bearer {}", api.token.expose())),
    );
    h.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/vnd.github+json"),
    );
    h.insert(
        "x-github-api-version",
        HeaderValue::from_static("2022-11-28"),
    );
    h
}

/// `repos/{owner}/{repo}/issues/comments/{comment}/reactions`, or
/// `repos/{owner}/{repo}/issues/{number}/comments`.
pub fn answer_place(kind: &str, text: impl Fn(&str) -> Option<String>) -> Option<Place> {
    let repo = text("repo")?;
    let (owner, name) = repo.split_once('/')?;
    let mut segments: Vec<String> =
        vec!["repos".into(), owner.into(), name.into(), "issues".into()];
    match kind {
        "reaction" => segments.extend(["comments".into(), text("comment")?, "reactions".into()]),
        "comment" => segments.extend([text("number")?, "comments".into()]),
        _ => return None,
    }
    Some((segments, Vec::new()))
}

/// Whether the actor is an active member of one of the gate's teams.
pub async fn check(checker: &Checker, api: &ProviderApi, gate: &Gate) -> Finding {
    let Gate::GitHub { user, org, teams } = gate else {
        return failure("not a GitHub check".into());
    };
    let mut seen = Vec::new();
    for team in teams {
        let key = format!("gh-team\n{org}\n{team}\n{user}");
        let fetched = checker
            .cached(key, || async {
                let path = ["orgs", org, "teams", team, "memberships", user];
                match checker.get(Via::GitHub, api, &path, &[]).await? {
                    None => Ok(Fetched::Missing),
                    Some(v) => Ok(Fetched::Membership(
                        v["state"].as_str().unwrap_or("unknown").to_owned(),
                    )),
                }
            })
            .await;
        let name = format!("{}/{}", printable(org), printable(team));
        match fetched {
            Ok(Fetched::Membership(state)) if state == "active" => {
                return Finding::OnCall(format!(
                    "member: {} is an active member of {name} (GitHub)",
                    printable(user)
                ));
            }
            Ok(Fetched::Membership(state)) => {
                seen.push(format!("{name}: membership {}", printable(&state)));
            }
            Ok(_) => seen.push(format!("{name}: not a member")),
            Err(f) => return f,
        }
    }
    Finding::NotOnCall(format!(
        "not a member: {} is not an active member of {} ({})",
        printable(user),
        org_teams(org, teams),
        seen.join("; ")
    ))
}
