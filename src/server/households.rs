//! `/api/v1` record endpoints for staff (and officers, within their villages): the household
//! list, detail, history, review, follow-ups, member corrections, the change feed, the CSV
//! export and coverage. Method and path first, then credentials, then query and body; each
//! handler is a thin call into `staff::StaffDesk`. Must not hold record logic or decide
//! access (that is `staff`).

use bytes::Bytes;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::auth::{self, CSRF_HEADER};
use super::errors::{respond, ApiError};
use super::Services;
use crate::accounts::Authenticated;
use crate::ids::DocumentId;
use crate::projection::{Cursor, Filter as ListFilter};
use crate::records::FollowUpUpdate;
use crate::staff::{AsOf, FollowUpRequest, MemberCorrection, ReviewRequest, StaffDesk, VisitPage};

type Route = BoxedFilter<(Box<dyn Reply>,)>;

/// Largest JSON body these endpoints accept.
const MAX_BODY_BYTES: u64 = 64 * 1024;
/// Households per page unless `limit` says otherwise, and the most a page may hold.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;
/// The filter parameters (besides these, `token` may carry a device token).
const FILTER_PARAMS: [&str; 12] = [
    "village",
    "officer",
    "matter_kind",
    "matter_status",
    "follow_up_status",
    "overdue",
    "review",
    "updated_since",
    "q",
    "conflicts",
    "quarantined",
    "merged",
];

pub(super) fn routes(services: &Services) -> Route {
    let desk = StaffDesk::new(
        services.hub.clone(),
        services.accounts.clone(),
        services.changelog.clone(),
        services.projection.clone(),
    );
    list(services, &desk)
        .or(detail(services, &desk))
        .unify()
        .or(history(services, &desk))
        .unify()
        .or(review(services, &desk))
        .unify()
        .or(create_follow_up(services, &desk))
        .unify()
        .or(update_follow_up(services, &desk))
        .unify()
        .or(correct_member(services, &desk))
        .unify()
        .or(mark_for_meeting(services, &desk))
        .unify()
        .or(merge(services, &desk))
        .unify()
        .or(changes(services, &desk))
        .unify()
        .or(export(services, &desk))
        .unify()
        .or(coverage(services, &desk))
        .unify()
        .or(reports(services, &desk))
        .unify()
        .boxed()
}

/// The raw query string ("" when there is none).
fn raw_query() -> BoxedFilter<(String,)> {
    warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .boxed()
}

/// The query's pairs, refusing parameters not in `allowed` (a typo must not silently widen
/// a filter).
fn query_pairs(raw: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::bad_request(format!("the query string is not valid: {e}")))?;
    for (k, _) in &pairs {
        if k != "token" && !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{k}`; accepted: {}",
                allowed.join(", ")
            )));
        }
    }
    Ok(pairs)
}

fn param<T: std::str::FromStr>(
    pairs: &[(String, String)],
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match pairs.iter().find(|(k, _)| k == name) {
        Some((_, v)) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("`{name}` must be {what}"))),
        None => Ok(None),
    }
}

fn filter_from(raw: &str, extra: &[&str]) -> Result<(ListFilter, Vec<(String, String)>), ApiError> {
    let allowed: Vec<&str> = FILTER_PARAMS.iter().chain(extra).copied().collect();
    let pairs = query_pairs(raw, &allowed)?;
    let only_filters: Vec<&(String, String)> = pairs
        .iter()
        .filter(|(k, _)| FILTER_PARAMS.contains(&k.as_str()))
        .collect();
    let encoded = serde_urlencoded::to_string(&only_filters)
        .map_err(|e| ApiError::bad_request(format!("the query string is not valid: {e}")))?;
    let filter: ListFilter = serde_urlencoded::from_str(&encoded)
        .map_err(|e| ApiError::bad_request(format!("a filter is not valid: {e}")))?;
    Ok((filter, pairs))
}

fn doc_id(raw: &str) -> Result<DocumentId, ApiError> {
    DocumentId::parse_url_or_id(raw).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("`{raw}` is not a household id (an automerge document id or URL)"),
        )
    })
}

fn json_body() -> BoxedFilter<(Bytes,)> {
    warp::body::content_length_limit(MAX_BODY_BYTES)
        .and(warp::body::bytes())
        .boxed()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not the expected JSON: {e}")))
}

fn json(value: &impl serde::Serialize) -> Box<dyn Reply> {
    Box::new(warp::reply::json(value))
}

/// `GET /api/v1/households?<filters>&cursor=&limit=`
fn list(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::get()
        .and(warp::path!("api" / "v1" / "households"))
        .and(auth::caller(services))
        .and(raw_query())
        .then(move |who: Result<Authenticated, ApiError>, raw: String| {
            let desk = desk.clone();
            async move {
                respond(
                    async {
                        let who = who?;
                        let (filter, pairs) = filter_from(&raw, &["cursor", "limit"])?;
                        let cursor = match pairs.iter().find(|(k, _)| k == "cursor") {
                            Some((_, c)) => Some(Cursor::decode(c).ok_or_else(|| {
                                ApiError::bad_request("`cursor` is not one this server handed out; start again without it")
                            })?),
                            None => None,
                        };
                        let limit = param::<usize>(&pairs, "limit", "a number from 1 to 500")?
                            .unwrap_or(DEFAULT_PAGE);
                        if !(1..=MAX_PAGE).contains(&limit) {
                            return Err(ApiError::bad_request("`limit` must be a number from 1 to 500"));
                        }
                        let page = desk.list(who.principal(), filter, cursor, limit).await?;
                        Ok(json(&page))
                    }
                    .await,
                )
            }
        })
        .boxed()
}

/// The (offset, limit) of a paged endpoint from the query (the only parameters it takes):
/// offset defaults to 0, limit to `default` and must be 1 to `max`.
fn page_params(
    raw: &str,
    (offset_name, limit_name): (&str, &str),
    default: usize,
    max: usize,
) -> Result<(usize, usize), ApiError> {
    let pairs = query_pairs(raw, &[offset_name, limit_name])?;
    page_from(&pairs, (offset_name, limit_name), default, max)
}

/// The page `pairs` ask for (checked by [`query_pairs`] already).
fn page_from(
    pairs: &[(String, String)],
    (offset_name, limit_name): (&str, &str),
    default: usize,
    max: usize,
) -> Result<(usize, usize), ApiError> {
    let offset = param(pairs, offset_name, "a whole number")?.unwrap_or(0);
    let limit = param(pairs, limit_name, "a whole number")?.unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(format!(
            "`{limit_name}` must be 1 to {max}"
        )));
    }
    Ok((offset, limit))
}

/// `at` (a server receive time, ms) or `heads` (comma-separated change hashes), not both.
fn as_of_param(pairs: &[(String, String)]) -> Result<Option<AsOf>, ApiError> {
    let at: Option<i64> = param(pairs, "at", "a time in milliseconds since the epoch")?;
    let heads: Option<String> = param(pairs, "heads", "comma-separated change hashes")?;
    match (at, heads) {
        (Some(_), Some(_)) => Err(ApiError::bad_request("give `at` or `heads`, not both")),
        (Some(t), None) => Ok(Some(AsOf::ReceivedBy(t))),
        (None, Some(h)) => {
            let heads = h
                .split(',')
                .map(|x| {
                    x.trim().parse::<automerge::ChangeHash>().map_err(|_| {
                        ApiError::bad_request(format!("`heads`: `{x}` is not a change hash"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if heads.is_empty() || heads.len() > 64 {
                return Err(ApiError::bad_request("`heads` takes 1 to 64 change hashes"));
            }
            Ok(Some(AsOf::Heads(heads)))
        }
        (None, None) => Ok(None),
    }
}

/// `GET /api/v1/households/{id}?visits_offset=&visits_limit=&at=|heads=`
fn detail(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::get()
        .and(warp::path!("api" / "v1" / "households" / String))
        .and(auth::caller(services))
        .and(raw_query())
        .then(
            move |id: String, who: Result<Authenticated, ApiError>, raw: String| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let pairs = query_pairs(
                                &raw,
                                &["visits_offset", "visits_limit", "at", "heads"],
                            )?;
                            let (offset, limit) = page_from(
                                &pairs,
                                ("visits_offset", "visits_limit"),
                                VisitPage::DEFAULT_LIMIT,
                                VisitPage::MAX_LIMIT,
                            )?;
                            let page = VisitPage { offset, limit };
                            let as_of = as_of_param(&pairs)?;
                            let d = desk
                                .detail(who.principal(), doc_id(&id)?, page, as_of)
                                .await?;
                            Ok(json(&d))
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// Changes per history page unless `limit` says otherwise, and at most.
const HISTORY_PAGE: usize = 100;
const HISTORY_PAGE_MAX: usize = 500;

/// `GET /api/v1/households/{id}/history?offset=&limit=`
fn history(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::get()
        .and(warp::path!(
            "api" / "v1" / "households" / String / "history"
        ))
        .and(auth::caller(services))
        .and(raw_query())
        .then(
            move |id: String, who: Result<Authenticated, ApiError>, raw: String| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let (offset, limit) = page_params(
                                &raw,
                                ("offset", "limit"),
                                HISTORY_PAGE,
                                HISTORY_PAGE_MAX,
                            )?;
                            let page = desk
                                .history(who.principal(), doc_id(&id)?, offset, limit)
                                .await?;
                            Ok(json(&page))
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// Credentials, CSRF header and a bounded JSON body: what every state-changing endpoint takes.
fn write_ctx(services: &Services) -> BoxedFilter<(Result<Authenticated, ApiError>, Bytes)> {
    auth::caller(services)
        .and(warp::header::optional::<String>(CSRF_HEADER))
        .and(json_body())
        .map(
            |who: Result<Authenticated, ApiError>, csrf: Option<String>, body: Bytes| {
                let who = who.and_then(|w| auth::check_csrf(&w, csrf.as_deref()).map(|()| w));
                (who, body)
            },
        )
        .untuple_one()
        .boxed()
}

/// `POST /api/v1/households/{id}/review {"state", "comment"}` -> the updated detail.
fn review(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::post()
        .and(warp::path!("api" / "v1" / "households" / String / "review"))
        .and(write_ctx(services))
        .then(
            move |id: String, who: Result<Authenticated, ApiError>, body: Bytes| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let req: ReviewRequest = parse(&body)?;
                            let d = desk.review(who.principal(), doc_id(&id)?, req).await?;
                            Ok(json(&d))
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// `POST /api/v1/households/{id}/follow-ups {"task", "owner", "due_ms", "matter"?}` -> 201 `{"id"}`.
fn create_follow_up(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::post()
        .and(warp::path!(
            "api" / "v1" / "households" / String / "follow-ups"
        ))
        .and(write_ctx(services))
        .then(
            move |id: String, who: Result<Authenticated, ApiError>, body: Bytes| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let req: FollowUpRequest = parse(&body)?;
                            let new = desk
                                .create_follow_up(who.principal(), doc_id(&id)?, req)
                                .await?;
                            Ok(Box::new(warp::reply::with_status(
                                warp::reply::json(&serde_json::json!({ "id": new })),
                                StatusCode::CREATED,
                            )) as Box<dyn Reply>)
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// `PATCH /api/v1/households/{id}/follow-ups/{fid} {"owner"?, "due_ms"?, "status"?, "note"?}`
fn update_follow_up(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::patch()
        .and(warp::path!(
            "api" / "v1" / "households" / String / "follow-ups" / String
        ))
        .and(write_ctx(services))
        .then(
            move |id: String, fid: String, who: Result<Authenticated, ApiError>, body: Bytes| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let update: FollowUpUpdate = parse(&body)?;
                            desk.update_follow_up(who.principal(), doc_id(&id)?, fid, update)
                                .await?;
                            Ok(json(&serde_json::json!({ "updated": true })))
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// `PATCH /api/v1/households/{id}/members/{mid} {"field", "value"}`
fn correct_member(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::patch()
        .and(warp::path!(
            "api" / "v1" / "households" / String / "members" / String
        ))
        .and(write_ctx(services))
        .then(
            move |id: String, mid: String, who: Result<Authenticated, ApiError>, body: Bytes| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let c: MemberCorrection = parse(&body)?;
                            desk.correct_member(who.principal(), doc_id(&id)?, mid, c)
                                .await?;
                            Ok(json(&serde_json::json!({ "updated": true })))
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// `PUT /api/v1/households/{id}/visits/{visit}/meeting` with `{"for_meeting": bool}`.
fn mark_for_meeting(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::put()
        .and(warp::path!(
            "api" / "v1" / "households" / String / "visits" / String / "meeting"
        ))
        .and(write_ctx(services))
        .then(
            move |id: String, vid: String, who: Result<Authenticated, ApiError>, body: Bytes| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let mark: crate::staff::MeetingMark = parse(&body)?;
                            let for_meeting = mark.for_meeting;
                            desk.mark_for_meeting(who.principal(), doc_id(&id)?, vid, mark)
                                .await?;
                            Ok(json(&serde_json::json!({ "for_meeting": for_meeting })))
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// `POST /api/v1/households/{survivor}/merge` with `{"retire": "<household id>"}`: copies
/// the retired household into the survivor and marks it merged (see `records::merge`).
fn merge(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::post()
        .and(warp::path!("api" / "v1" / "households" / String / "merge"))
        .and(write_ctx(services))
        .then(
            move |id: String, who: Result<Authenticated, ApiError>, body: Bytes| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let req: crate::staff::MergeRequest = parse(&body)?;
                            let survivor = doc_id(&id)?;
                            let retire = DocumentId::parse_url_or_id(&req.retire).map_err(|_| {
                                ApiError::bad_request(format!(
                                    "`retire`: `{}` is not a household id (an automerge document id or URL)",
                                    req.retire.escape_debug()
                                ))
                            })?;
                            let outcome = desk.merge(who.principal(), survivor, retire).await?;
                            Ok(json(&outcome))
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// `GET /api/v1/changes?after=SEQ&limit=N`
fn changes(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::get()
        .and(warp::path!("api" / "v1" / "changes"))
        .and(auth::caller(services))
        .and(raw_query())
        .then(move |who: Result<Authenticated, ApiError>, raw: String| {
            let desk = desk.clone();
            async move {
                respond(
                    async {
                        let who = who?;
                        let pairs = query_pairs(&raw, &["after", "limit"])?;
                        let after =
                            param::<u64>(&pairs, "after", "a sequence number")?.unwrap_or(0);
                        let limit = param::<usize>(&pairs, "limit", "a number from 1 to 1000")?
                            .unwrap_or(100);
                        if !(1..=1000).contains(&limit) {
                            return Err(ApiError::bad_request(
                                "`limit` must be a number from 1 to 1000",
                            ));
                        }
                        let page = desk.changes(who.principal(), after, limit).await?;
                        Ok(json(&page))
                    }
                    .await,
                )
            }
        })
        .boxed()
}

/// A stream of CSV chunks from the export thread; `Sync` as warp's streamed body requires.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl futures_util::Stream for Chunks {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// `GET /api/v1/export.csv?<filters>`: streamed; a failure after the first chunk ends the
/// body early (the status is already sent), and is logged.
fn export(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::get()
        .and(warp::path!("api" / "v1" / "export.csv"))
        .and(auth::caller(services))
        .and(raw_query())
        .then(move |who: Result<Authenticated, ApiError>, raw: String| {
            let desk = desk.clone();
            async move {
                respond(
                    async {
                        let who = who?;
                        let (filter, _) = filter_from(&raw, &[])?;
                        filter.validate().map_err(ApiError::bad_request)?;
                        desk.check_reader(who.principal())?;
                        let slot = desk.reserve_export()?;
                        // A few chunks in flight: the export thread waits for a slow client.
                        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
                        let principal = who.principal().clone();
                        tokio::spawn(async move {
                            let sink = move |chunk: Vec<u8>| tx.blocking_send(Bytes::from(chunk)).is_ok();
                            match desk.export(slot, &principal, filter, sink).await {
                                Ok(rows) => tracing::info!(user = %principal.user, rows, "export streamed"),
                                Err(e) => tracing::warn!(user = %principal.user, error = %e, "export ended early"),
                            }
                        });
                        let reply = warp::reply::with_header(
                            warp::reply::stream(Chunks(rx)),
                            "content-type",
                            "text/csv; charset=utf-8",
                        );
                        Ok(Box::new(warp::reply::with_header(
                            reply,
                            "content-disposition",
                            "attachment; filename=\"fieldsync-visits.csv\"",
                        )) as Box<dyn Reply>)
                    }
                    .await,
                )
            }
        })
        .boxed()
}

/// `GET /api/v1/coverage?days=30`
/// What a report route answers with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReportForm {
    /// The whole monthly report (JSON).
    Monthly,
    /// The public summary (JSON).
    Public,
    /// The public summary (CSV).
    PublicCsv,
}

/// `GET /api/v1/reports/monthly`, `/api/v1/reports/public` and `/api/v1/reports/public.csv`,
/// each `?month=YYYY-MM[&village=]`.
fn reports(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    let offset = services.config.utc_offset_minutes;
    let form = warp::path!("api" / "v1" / "reports" / "monthly")
        .map(|| ReportForm::Monthly)
        .or(warp::path!("api" / "v1" / "reports" / "public").map(|| ReportForm::Public))
        .unify()
        .or(warp::path!("api" / "v1" / "reports" / "public.csv").map(|| ReportForm::PublicCsv))
        .unify();
    warp::get()
        .and(form)
        .and(auth::caller(services))
        .and(raw_query())
        .then(
            move |form: ReportForm, who: Result<Authenticated, ApiError>, raw: String| {
                let desk = desk.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            let pairs = query_pairs(&raw, &["month", "village"])?;
                            let month: String = param(&pairs, "month", "a month as YYYY-MM")?
                                .ok_or_else(|| {
                                    ApiError::bad_request("`month` is required, as YYYY-MM")
                                })?;
                            let month = crate::projection::report::Month::parse(&month)
                                .ok_or_else(|| {
                                    ApiError::bad_request(format!(
                                        "`month`: `{month}` is not a month as YYYY-MM"
                                    ))
                                })?;
                            let village: Option<String> = param(&pairs, "village", "a village")?;
                            let report = desk
                                .monthly_report(who.principal(), month, village, offset)
                                .await?;
                            Ok(match form {
                                ReportForm::Monthly => json(&report),
                                ReportForm::Public => json(&report.public()),
                                ReportForm::PublicCsv => {
                                    let name = format!(
                                        "attachment; filename=\"fieldsync-public-{}.csv\"",
                                        report.month
                                    );
                                    Box::new(warp::reply::with_header(
                                        warp::reply::with_header(
                                            report.public().csv(),
                                            "content-type",
                                            "text/csv; charset=utf-8",
                                        ),
                                        "content-disposition",
                                        name,
                                    )) as Box<dyn Reply>
                                }
                            })
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

fn coverage(services: &Services, desk: &StaffDesk) -> Route {
    let desk = desk.clone();
    warp::get()
        .and(warp::path!("api" / "v1" / "coverage"))
        .and(auth::caller(services))
        .and(raw_query())
        .then(move |who: Result<Authenticated, ApiError>, raw: String| {
            let desk = desk.clone();
            async move {
                respond(
                    async {
                        let who = who?;
                        let pairs = query_pairs(&raw, &["days"])?;
                        let days = param::<u32>(&pairs, "days", "a number of days from 1 to 3650")?
                            .unwrap_or(30);
                        if !(1..=3650).contains(&days) {
                            return Err(ApiError::bad_request(
                                "`days` must be a number of days from 1 to 3650",
                            ));
                        }
                        let villages = desk.coverage(who.principal(), days).await?;
                        Ok(json(
                            &serde_json::json!({ "days": days, "villages": villages }),
                        ))
                    }
                    .await,
                )
            }
        })
        .boxed()
}
