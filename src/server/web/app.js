// fieldsync staff page: a small single-page app on the JSON API (proto-docs/http-api.md).
// No framework and no build step: the binary embeds this file. Every piece of text that
// comes from a device or the API is put in the page with textContent (never as HTML), and
// the server's Content-Security-Policy allows no inline script: a note containing markup
// shows as the characters it is.
"use strict";

const GOAL = 0.8; // share of households visited in the last 30 days a village should reach
const DAYS = 30;

const T = {
  zh: {
    dashboard: "轄區概況", households: "住戶", signin: "登入", signout: "登出", lang: "English",
    report: "月報", reportTitle: m => `${m} 警民懇談會月報`, month: "月份", print: "列印", publicCsv: "警務公開（CSV）",
    visitsN: "訪視", coverage: "訪視率", raised: "受理案件", resolved: "已解決", mediated: "已調解", referred: "已轉介",
    openFollowUps: "待追蹤", satisfaction: "滿意度", security: "治安感受", vsPrevious: "較上月", suggestions: "民眾建議",
    stationTotal: "全所合計", byServerTime: "依伺服器時間", visitedMonth: "本月已訪戶",
    duplicate: "可能重複", duplicateHint: "同村里有相同地址的住戶，可能重複登錄：",
    mergeHere: "合併至此戶", mergeConfirm: "確認合併？（另一戶的成員、訪視、案件將複製到此戶，原戶保留但不再列出）",
    mergedInto: "此戶已合併至", mergedFrom: "已併入此戶的住戶", afterMerge: "合併後才收到的資料", mergeAgain: "複製合併後的資料",
    copiedFrom: "併自", merged: "已合併", lateAfterMerge: "合併後有新資料", publicSummary: "警務公開摘要",
    publicNote: n => `不含姓名、地址、電話、紀錄內容及機密案件；少於 ${n} 的數字以「<${n}」表示。`, outcomes: "訪視結果", modes: "訪視方式",
    forMeeting: "懇談會選用", chooseForMeeting: "選入懇談會", meetingNotes: "懇談會紀錄摘要", changedThen: "此版本相較前一版變更的欄位",
    name: "帳號", memberName: "姓名", password: "密碼", wrongPassword: "帳號或密碼錯誤", village: "村里",
    householdsN: "戶數", visited: `近${DAYS}日已訪`, never: "從未訪視", openMatters: "未結案件",
    overdue: "逾期追蹤", quarantined: "隔離", behind: "未達目標", onTrack: "達標",
    goal: `目標：${DAYS}日內訪視 ${GOAL * 100}% 住戶`, address: "地址", lastVisit: "最近訪視",
    visits: "訪視次數", followUps: "追蹤", review: "審核", conflicts: "衝突", all: "全部",
    search: "搜尋", filter: "篩選", export: "匯出 CSV", next: "下一頁", first: "第一頁",
    matterKind: "案件類別", matterStatus: "案件狀態", followUpStatus: "追蹤狀態",
    overdueOnly: "僅逾期", total: "共", members: "成員", relation: "關係", phone: "電話",
    visitsTimeline: "訪視紀錄", officer: "員警", deviceTime: "裝置時間", serverTime: "伺服器收到",
    matters: "案件", kind: "類別", status: "狀態", risk: "風險", actions: "處理", description: "內容",
    task: "工作", owner: "負責員警", due: "期限", create: "新增", close: "結案", save: "儲存",
    conflictsTitle: "同時修改的欄位", value: "值", by: "填寫者", history: "變更紀錄", fields: "欄位",
    historyShown: (n, total) => `顯示最早的 ${n} 筆，共 ${total} 筆變更`,
    asOf: (time, n, total) => `此為 ${time} 當時的紀錄（${total} 筆變更中的前 ${n} 筆）`, viewThen: "查看當時", current: "回到目前紀錄",
    visitsShown: (n, total) => `顯示最近的 ${n} 次，共 ${total} 次訪視`,
    reviewState: "審核狀態", approve: "核准", hasIssues: "有問題", reject: "退回", comment: "意見",
    changedSince: "核准後已有變更", changedFields: "變更欄位", noneYet: "尚無資料",
    staffEdit: "（承辦人員）", back: "返回列表", notFound: "找不到此住戶，或您無權查看。",
    newFollowUp: "新增追蹤", device: "裝置", reviewedBy: "審核人",
    received: "待審", has_issues: "有問題", approved: "已核准", rejected: "已退回",
    changed_since_approval: "核准後變更", todo: "待辦", done: "完成", cancelled: "取消",
    open: "未結", new: "新案", in_progress: "處理中", mediated: "已調解", referred: "已轉介",
    resolved: "已解決", closed: "已結案", consultation: "諮詢", complaint: "陳情", tip: "線報",
    dispute: "糾紛", help: "求助", suggestion: "建議", hazard: "危害", met: "已晤談",
    nobody_home: "無人在家", refused: "拒訪", moved: "已遷出", vacant: "空屋",
    saved: "已儲存", failed: "失敗", mode_in_home: "入戶", mode_doorstep: "門口", mode_phone: "電話",
    visitBy: "訪視", premises: "用途",
  },
  en: {
    dashboard: "Coverage", households: "Households", signin: "Sign in", signout: "Sign out", lang: "中文",
    report: "Monthly report", reportTitle: m => `Police–community meeting report, ${m}`, month: "Month", print: "Print", publicCsv: "Public summary (CSV)",
    visitsN: "Visits", coverage: "Coverage", raised: "Matters raised", resolved: "Resolved", mediated: "Mediated", referred: "Referred",
    openFollowUps: "Open follow-ups", satisfaction: "Satisfaction", security: "Feeling safe", vsPrevious: "vs. last month", suggestions: "Residents' suggestions",
    stationTotal: "Station total", byServerTime: "by server time", visitedMonth: "Visited this month",
    duplicate: "Possible duplicate", duplicateHint: "Another household of this village has the same address; it may be registered twice:",
    mergeHere: "Merge into this household", mergeConfirm: "Merge? (the other household's members, visits and matters are copied here; it is kept but no longer listed)",
    mergedInto: "This household was merged into", mergedFrom: "Households merged into this one", afterMerge: "Arrived after the merge", mergeAgain: "Copy what arrived after the merge",
    copiedFrom: "copied from", merged: "Merged", lateAfterMerge: "Changed after merge", publicSummary: "Public summary",
    publicNote: n => `No names, addresses, phone numbers, notes or confidential matters; counts under ${n} are shown as "<${n}".`, outcomes: "Visit outcomes", modes: "Visit modes",
    forMeeting: "For the meeting", chooseForMeeting: "Choose for the meeting", meetingNotes: "Notes for the meeting", changedThen: "Changed from the version before",
    name: "Account", memberName: "Name", password: "Password", wrongPassword: "Wrong account or password", village: "Village",
    householdsN: "Households", visited: `Visited (${DAYS} d)`, never: "Never visited", openMatters: "Open matters",
    overdue: "Overdue follow-ups", quarantined: "Quarantined", behind: "Behind goal", onTrack: "On track",
    goal: `Goal: ${GOAL * 100}% of households visited within ${DAYS} days`, address: "Address", lastVisit: "Last visit",
    visits: "Visits", followUps: "Follow-ups", review: "Review", conflicts: "Conflicts", all: "All",
    search: "Search", filter: "Filter", export: "Export CSV", next: "Next page", first: "First page",
    matterKind: "Matter kind", matterStatus: "Matter status", followUpStatus: "Follow-up status",
    overdueOnly: "Overdue only", total: "Total", members: "Members", relation: "Relation", phone: "Phone",
    visitsTimeline: "Visits", officer: "Officer", deviceTime: "Device time", serverTime: "Received",
    matters: "Matters", kind: "Kind", status: "Status", risk: "Risk", actions: "Actions", description: "Description",
    task: "Task", owner: "Owner", due: "Due", create: "Create", close: "Close", save: "Save",
    conflictsTitle: "Fields with concurrent values", value: "Value", by: "Written by", history: "History", fields: "Fields",
    historyShown: (n, total) => `The first ${n} of ${total} changes`,
    asOf: (time, n, total) => `The record as it was at ${time} (${n} of its ${total} changes)`, viewThen: "View as it was", current: "Back to the current record",
    visitsShown: (n, total) => `The latest ${n} of ${total} visits`,
    reviewState: "Review state", approve: "Approve", hasIssues: "Has issues", reject: "Reject", comment: "Comment",
    changedSince: "Changed since approval", changedFields: "Changed fields", noneYet: "Nothing yet",
    staffEdit: " (staff)", back: "Back to the list", notFound: "No such household, or not one you may see.",
    newFollowUp: "New follow-up", device: "Device", reviewedBy: "Reviewed by",
    received: "Received", has_issues: "Has issues", approved: "Approved", rejected: "Rejected",
    changed_since_approval: "Changed since approval", todo: "To do", done: "Done", cancelled: "Cancelled",
    open: "Open", new: "New", in_progress: "In progress", mediated: "Mediated", referred: "Referred",
    resolved: "Resolved", closed: "Closed", consultation: "Consultation", complaint: "Complaint", tip: "Tip",
    dispute: "Dispute", help: "Help", suggestion: "Suggestion", hazard: "Hazard", met: "Met",
    nobody_home: "Nobody home", refused: "Refused", moved: "Moved", vacant: "Vacant",
    saved: "Saved", failed: "Failed", mode_in_home: "in home", mode_doorstep: "at the door", mode_phone: "by phone",
    visitBy: "visit", premises: "Premises",
  },
};

const state = { lang: localStorage.getItem("fieldsync.lang") || "zh", me: null, csrf: null };
const t = key => T[state.lang][key] ?? key;

// el("td", {class: "num"}, "text", child...): strings become text nodes, never markup.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// "members.<id>.phone" -> "Chen Mei-ling · 電話": field paths in words staff recognise.
function fieldLabel(path, d) {
  const [map, id, ...rest] = path.split(".");
  const field = rest.join(".");
  const entry = Array.isArray(d[map]) ? d[map].find(e => e.id === id) : undefined;
  if (map === "members" && entry) return `${entry.value.name} · ${t(field) || field}`;
  if (map === "visits" && entry) return `${t("visitBy")} ${who(entry.created_by)}${field ? " · " + field : ""}`;
  if (path === "premises") return t("premises");
  return path;
}

const fmtTime = ms => (ms ? new Date(ms).toLocaleString(state.lang === "zh" ? "zh-TW" : "en-GB") : "—");
const fmtDate = ms => (ms ? new Date(ms).toLocaleDateString(state.lang === "zh" ? "zh-TW" : "en-GB") : "—");
const who = a => (a ? a.user + (a.device ? "" : t("staffEdit")) : "?");

function toast(text) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 3000);
}

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

async function api(method, path, body) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["x-csrf-token"] = state.csrf;
  const res = await fetch(`/api/v1${path}`, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => null);
  if (res.status === 401 && path !== "/session") {
    state.me = null;
    render();
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// ---- sign in / out --------------------------------------------------------------------

function signInView() {
  const error = el("p", { class: "error", id: "signin-error" });
  const form = el(
    "form",
    { class: "panel signin", id: "signin" },
    el("h1", {}, t("signin")),
    el("label", {}, t("name"), el("input", { name: "name", autocomplete: "username", required: true })),
    el("label", {}, t("password"), el("input", { name: "password", type: "password", autocomplete: "current-password", required: true })),
    error,
    el("button", { class: "primary", type: "submit" }, t("signin")),
  );
  form.addEventListener("submit", async e => {
    e.preventDefault();
    const f = new FormData(form);
    try {
      const s = await api("POST", "/session", { name: f.get("name"), password: f.get("password") });
      state.csrf = s.csrf_token;
      await loadMe();
      location.hash = "#/";
      render();
    } catch (err) {
      error.textContent = err.status === 401 ? t("wrongPassword") : err.message;
    }
  });
  return form;
}

async function loadMe() {
  try {
    const me = await api("GET", "/me");
    state.me = me;
    state.csrf = me.csrf_token || state.csrf;
  } catch {
    state.me = null;
  }
}

async function signOut() {
  try {
    await api("DELETE", "/session");
  } finally {
    state.me = null;
    state.csrf = null;
    location.hash = "#/";
    render();
  }
}

// ---- dashboard --------------------------------------------------------------------------

async function dashboardView() {
  const cov = await api("GET", `/coverage?days=${DAYS}`);
  const rows = cov.villages.map(v => {
    const share = v.households ? v.visited_recently / v.households : 1;
    const behind = v.households > 0 && share < GOAL;
    const kinds = Object.entries(v.open_matters).map(([k, n]) => el("span", { class: "badge" }, `${t(k)} ${n}`));
    return el(
      "tr",
      { class: behind ? "behind" : "", dataset: { village: v.village } },
      el("td", {}, el("a", { href: `#/households?village=${encodeURIComponent(v.village)}` }, v.village)),
      el("td", { class: "num", dataset: { col: "households" } }, v.households),
      el("td", { class: "num", dataset: { col: "visited" } }, v.visited_recently, v.households ? ` (${Math.round(share * 100)}%)` : ""),
      el("td", { class: "num", dataset: { col: "never" } }, v.never_visited),
      el("td", { dataset: { col: "matters" } }, v.open_matters_total ? kinds : "0"),
      el("td", { class: "num", dataset: { col: "overdue" } }, v.follow_ups_overdue),
      el("td", { class: "num" }, v.quarantined),
      el("td", { class: "num", dataset: { col: "merged" } }, v.merged,
        v.changed_after_merge ? el("a", { class: "badge warn late", href: `#/households?merged=after_merge&village=${encodeURIComponent(v.village)}` }, `${t("lateAfterMerge")} ${v.changed_after_merge}`) : ""),
      el("td", {}, el("span", { class: behind ? "badge warn" : "badge ok" }, behind ? t("behind") : t("onTrack"))),
    );
  });
  return el(
    "section",
    { id: "dashboard" },
    el("h1", {}, t("dashboard"), " — ", state.me.station),
    el("p", { class: "meta" }, t("goal")),
    el(
      "table",
      { id: "coverage" },
      el("thead", {}, el("tr", {}, [t("village"), t("householdsN"), t("visited"), t("never"), t("openMatters"), t("overdue"), t("quarantined"), t("merged"), ""].map(h => el("th", {}, h)))),
      el("tbody", {}, rows),
    ),
  );
}

// ---- household list ---------------------------------------------------------------------

const FILTERS = ["village", "q", "matter_kind", "matter_status", "follow_up_status", "overdue", "review", "merged", "cursor"];

function select(name, values, current) {
  return el("select", { name }, el("option", { value: "" }, t("all")), values.map(v => el("option", { value: v, selected: v === current }, t(v))));
}

async function listView(params) {
  const query = new URLSearchParams();
  for (const k of FILTERS) if (params.get(k)) query.set(k, params.get(k));
  const page = await api("GET", `/households?${query}`);
  const form = el(
    "form",
    { class: "filters", id: "filters" },
    el("label", {}, t("search"), el("input", { name: "q", value: params.get("q") || "", type: "search" })),
    el("label", {}, t("village"), select("village", state.me.villages.map(v => v.name), params.get("village"))),
    el("label", {}, t("matterKind"), select("matter_kind", ["consultation", "complaint", "tip", "dispute", "help", "suggestion", "hazard"], params.get("matter_kind"))),
    el("label", {}, t("matterStatus"), select("matter_status", ["open", "new", "in_progress", "mediated", "referred", "resolved", "closed"], params.get("matter_status"))),
    el("label", {}, t("followUpStatus"), select("follow_up_status", ["todo", "done", "cancelled"], params.get("follow_up_status"))),
    el("label", {}, t("review"), select("review", ["received", "has_issues", "approved", "rejected", "changed_since_approval"], params.get("review"))),
    el("label", {}, t("overdueOnly"), el("input", { type: "checkbox", name: "overdue", value: "true", checked: params.get("overdue") === "true" })),
    el("label", {}, t("merged"), el("select", { name: "merged" }, el("option", { value: "" }, "—"),
      el("option", { value: "true", selected: params.get("merged") === "true" }, t("merged")),
      el("option", { value: "after_merge", selected: params.get("merged") === "after_merge" }, t("lateAfterMerge")))),
    el("button", { class: "primary", type: "submit" }, t("filter")),
  );
  form.addEventListener("submit", e => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = `#/households?${q}`;
  });
  const exportQuery = new URLSearchParams(query);
  exportQuery.delete("cursor");
  const rows = page.households.map(h =>
    el(
      "tr",
      { dataset: { id: h.id } },
      el("td", {}, el("a", { href: `#/household/${encodeURIComponent(h.id)}` }, h.address_label || h.id),
        h.possible_duplicates ? el("span", { class: "badge warn duplicate", title: t("duplicateHint") }, t("duplicate")) : "",
        h.merged_into ? el("span", { class: "badge merged" }, t("merged")) : "",
        h.after_merge ? el("span", { class: "badge warn late" }, `${t("lateAfterMerge")} ${h.after_merge.length}`) : ""),
      el("td", {}, h.village),
      el("td", {}, fmtDate(h.last_visit_at_ms)),
      el("td", { class: "num" }, h.visit_count),
      el("td", {}, Object.entries(h.open_matters).map(([k, n]) => el("span", { class: "badge" }, `${t(k)} ${n}`))),
      el("td", {}, h.follow_ups_todo ? `${h.follow_ups_todo}` : "0", h.follow_ups_overdue ? el("span", { class: "badge warn" }, `${t("overdue")} ${h.follow_ups_overdue}`) : ""),
      el("td", {}, t(h.review_state), h.changed_since_approval ? el("span", { class: "badge warn" }, t("changedSince")) : ""),
      el("td", { class: "num" }, h.conflicts),
    ),
  );
  const pager = el("div", { class: "pager" }, el("span", {}, `${t("total")} ${page.total}`));
  if (params.get("cursor")) {
    const first = new URLSearchParams(query);
    first.delete("cursor");
    pager.append(el("a", { href: `#/households?${first}` }, t("first")));
  }
  if (page.next_cursor) {
    const next = new URLSearchParams(query);
    next.set("cursor", page.next_cursor);
    pager.append(el("a", { href: `#/households?${next}`, id: "next-page" }, t("next")));
  }
  return el(
    "section",
    { id: "list" },
    el("h1", {}, t("households")),
    form,
    el("p", {}, el("a", { href: `/api/v1/export.csv?${exportQuery}`, id: "export", class: "secondary", download: "fieldsync-visits.csv" }, t("export"))),
    el(
      "table",
      { id: "households" },
      el("thead", {}, el("tr", {}, [t("address"), t("village"), t("lastVisit"), t("visits"), t("openMatters"), t("followUps"), t("review"), t("conflicts")].map(h => el("th", {}, h)))),
      el("tbody", {}, rows),
    ),
    pager,
  );
}

// ---- monthly report ------------------------------------------------------------------------

function thisMonth() {
  const d = new Date();
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}`;
}

// A time at the station's offset from UTC (`+08:00`), whatever the browser's zone.
function stationTime(ms, offset) {
  const m = /^([+-])(\d\d):(\d\d)$/.exec(offset || "+00:00");
  const minutes = m ? (m[1] === "-" ? -1 : 1) * (Number(m[2]) * 60 + Number(m[3])) : 0;
  return new Date(ms + minutes * 60000).toISOString().slice(0, 16).replace("T", " ");
}

async function reportView(params) {
  const month = params.get("month") || thisMonth();
  const r = await api("GET", `/reports/monthly?month=${encodeURIComponent(month)}`);
  const score = s => (s.average == null ? "—" : `${s.average} (${s.count})${s.change == null ? "" : ` ${s.change >= 0 ? "+" : ""}${s.change} ${t("vsPrevious")}`}`);
  const kinds = m => Object.entries(m).map(([k, n]) => `${t(k)} ${n}`).join("、") || "0";
  const row = (name, f, cls) => el(
    "tr",
    { class: cls || "", dataset: { village: name } },
    el("td", {}, name),
    el("td", { class: "num", dataset: { col: "households" } }, f.households),
    el("td", { class: "num", dataset: { col: "visited" } }, f.households_visited, f.coverage == null ? "" : ` (${Math.round(f.coverage * 100)}%)`),
    el("td", { class: "num", dataset: { col: "visits" } }, f.visits, f.visits_by_server_time ? el("div", { class: "meta" }, `${f.visits_by_server_time} ${t("byServerTime")}`) : ""),
    el("td", { dataset: { col: "raised" } }, kinds(f.matters_raised)),
    el("td", { class: "num" }, f.matters_resolved),
    el("td", { class: "num" }, f.matters_mediated),
    el("td", { class: "num" }, f.matters_referred),
    el("td", { class: "num" }, f.follow_ups_open, f.follow_ups_overdue ? el("div", { class: "meta" }, `${t("overdue")} ${f.follow_ups_overdue}`) : ""),
    el("td", { dataset: { col: "satisfaction" } }, score(f.satisfaction)),
    el("td", {}, score(f.security)),
  );
  const picker = el("input", { type: "month", name: "month", value: month });
  picker.addEventListener("change", () => { location.hash = `#/report?month=${encodeURIComponent(picker.value)}`; });
  return el(
    "section",
    { id: "report", dataset: { month: r.month } },
    el("div", { class: "no-print filters" },
      el("label", {}, t("month"), picker),
      el("button", { class: "secondary", type: "button", onclick: () => window.print() }, t("print")),
      el("a", { href: `#/public?month=${encodeURIComponent(r.month)}`, id: "public-page" }, t("publicSummary")), " ",
      el("a", { href: `/api/v1/reports/public.csv?month=${encodeURIComponent(r.month)}`, id: "public-csv" }, t("publicCsv"))),
    el("h1", {}, t("reportTitle")(r.month), " — ", state.me.station),
    el("p", { class: "meta", id: "report-period" }, `${stationTime(r.starts_at_ms, r.utc_offset)} – ${stationTime(r.ends_at_ms, r.utc_offset)} (UTC${r.utc_offset})`),
    el(
      "table",
      { id: "report-table" },
      el("thead", {}, el("tr", {}, [t("village"), t("householdsN"), t("visitedMonth"), t("visitsN"), t("raised"), t("resolved"), t("mediated"), t("referred"), t("openFollowUps"), t("satisfaction"), t("security")].map(h => el("th", {}, h)))),
      el("tbody", {}, r.villages.map(v => row(v.village, v)), row(t("stationTotal"), r.station, "total")),
    ),
    el("h2", {}, t("suggestions")),
    el("ul", { id: "suggestions" }, r.station.suggestions.map(s => el("li", {}, s.text, el("span", { class: "meta" }, ` — ${s.address_label}`)))),
    el("h2", {}, t("meetingNotes")),
    el("ul", { id: "meeting-notes" }, r.station.meeting_notes.map(n => el("li", {}, n.notes, el("span", { class: "meta" }, ` — ${n.officer} · ${stationTime(n.at_ms, r.utc_offset)} · ${n.address_label}`)))),
  );
}

// ---- public summary (警務公開) ------------------------------------------------------------

// The month's figures as the station may publish them: the API already left out every name,
// address, phone, note and confidential matter and suppressed small counts; this page only
// lays them out to print or to save as a page.
async function publicView(params) {
  const month = params.get("month") || thisMonth();
  const p = await api("GET", `/reports/public?month=${encodeURIComponent(month)}`);
  const kinds = m => Object.entries(m).map(([k, n]) => `${t(k)} ${n}`).join("、") || "0";
  const avg = a => (a == null ? "—" : String(a));
  const row = (name, f, cls) => el(
    "tr",
    { class: cls || "", dataset: { village: name } },
    el("td", {}, name),
    el("td", { class: "num", dataset: { col: "households" } }, f.households),
    el("td", { class: "num", dataset: { col: "visited" } }, f.households_visited, f.coverage_percent == null ? "" : ` (${f.coverage_percent}%)`),
    el("td", { class: "num", dataset: { col: "visits" } }, f.visits),
    el("td", {}, kinds(f.visits_by_outcome)),
    el("td", {}, kinds(f.matters_raised)),
    el("td", { class: "num" }, f.matters_resolved),
    el("td", { class: "num" }, f.matters_mediated),
    el("td", { class: "num" }, f.matters_referred),
    el("td", { class: "num" }, f.suggestions),
    el("td", { class: "num" }, avg(f.satisfaction_average)),
    el("td", { class: "num" }, avg(f.security_average)),
  );
  const picker = el("input", { type: "month", name: "month", value: month });
  picker.addEventListener("change", () => { location.hash = `#/public?month=${encodeURIComponent(picker.value)}`; });
  return el(
    "section",
    { id: "public", dataset: { month: p.month } },
    el("div", { class: "no-print filters" },
      el("label", {}, t("month"), picker),
      el("button", { class: "secondary", type: "button", onclick: () => window.print() }, t("print")),
      el("a", { href: `/api/v1/reports/public.csv?month=${encodeURIComponent(p.month)}` }, "CSV"), " ",
      el("a", { href: `/api/v1/reports/public?month=${encodeURIComponent(p.month)}` }, "JSON")),
    el("h1", {}, `${t("publicSummary")} ${p.month} — ${state.me.station}`),
    el("p", { class: "meta" }, t("publicNote")(p.suppressed_below), ` (UTC${p.utc_offset})`),
    el(
      "table",
      { id: "public-table" },
      el("thead", {}, el("tr", {}, [t("village"), t("householdsN"), t("visitedMonth"), t("visitsN"), t("outcomes"), t("raised"), t("resolved"), t("mediated"), t("referred"), t("suggestions"), t("satisfaction"), t("security")].map(h => el("th", {}, h)))),
      el("tbody", {}, p.villages.map(v => row(v.village, v)), row(t("stationTotal"), p.station, "total")),
    ),
  );
}

// ---- household detail -------------------------------------------------------------------

async function detailView(id, params) {
  // `at`: the record as the server had it at that time (a history row's link).
  const at = params && params.get("at");
  let d;
  try {
    d = await api("GET", `/households/${encodeURIComponent(id)}${at ? `?at=${encodeURIComponent(at)}` : ""}`);
  } catch (err) {
    if (err.status === 404) return el("section", {}, el("p", { class: "error", id: "not-found" }, t("notFound")), el("a", { href: "#/households" }, t("back")));
    throw err;
  }
  const history = await api("GET", `/households/${encodeURIComponent(id)}/history`);
  const v = d.value;
  const a = v.address || {};
  const reload = () => render();
  const mayEdit = !d.as_of && state.me.role !== "officer" && !d.merged_into;
  // Merging is asked twice (the first click turns the button into the question): no
  // modal dialog, and nothing happens on a stray click.
  const mergeButton = (retire, label, again) => {
    const b = el("button", { class: "secondary merge", type: "button", dataset: { retire } }, label);
    b.addEventListener("click", async () => {
      if (!again && !b.classList.contains("confirm")) {
        b.classList.add("confirm");
        b.textContent = t("mergeConfirm");
        return;
      }
      try {
        await api("POST", `/households/${encodeURIComponent(d.id)}/merge`, { retire });
        toast(t("saved"));
        reload();
      } catch (err) {
        toast(`${t("failed")}: ${err.message}`);
      }
    });
    return b;
  };

  const members = el(
    "table",
    { id: "members" },
    el("thead", {}, el("tr", {}, [t("memberName"), t("relation"), t("phone")].map(h => el("th", {}, h)))),
    el("tbody", {}, d.members.map(m => el("tr", {}, el("td", {}, m.value.name), el("td", {}, m.value.relation), el("td", {}, m.value.phone)))),
  );

  // Staff choose notes for the police–community meeting (not on a past version).
  const chosen = new Set(d.for_meeting || []);
  const meetingToggle = x => {
    if (d.as_of || state.me.role === "officer") return chosen.has(x.id) ? el("span", { class: "badge ok" }, t("forMeeting")) : "";
    const on = chosen.has(x.id);
    return el("button", {
      class: on ? "secondary meeting on" : "secondary meeting", type: "button",
      onclick: async () => {
        try {
          await api("PUT", `/households/${encodeURIComponent(d.id)}/visits/${encodeURIComponent(x.id)}/meeting`, { for_meeting: !on });
          toast(t("saved"));
          reload();
        } catch (err) {
          toast(`${t("failed")}: ${err.message}`);
        }
      },
    }, on ? `✓ ${t("forMeeting")}` : t("chooseForMeeting"));
  };
  const visits = el(
    "ol",
    { class: "timeline", id: "visits" },
    d.visits.map(x =>
      el(
        "li",
        { dataset: { officer: x.created_by?.user || "" } },
        el("strong", {}, `${t(x.value.outcome)} · ${t("mode_" + x.value.mode)}`),
        el(
          "div",
          { class: "meta" },
          `${t("officer")}: ${who(x.created_by)} · ${t("device")}: ${x.created_by?.device || "—"} · ${t("deviceTime")}: ${fmtTime(x.value.started_at)} · ${t("serverTime")}: ${fmtTime(x.created_by?.received_at_ms)}`,
          x.merged ? el("span", { class: "copied" }, ` · ${t("copiedFrom")} `, el("a", { href: `#/household/${encodeURIComponent(x.merged.from.replace(/^automerge:/, ""))}` }, x.merged.from.replace(/^automerge:/, "").slice(0, 8)), ` (${who(x.merged.by)})`) : "",
        ),
        el("div", { class: "notes" }, x.value.notes || ""),
        meetingToggle(x),
      ),
    ),
  );

  const matters = el(
    "table",
    { id: "matters" },
    el("thead", {}, el("tr", {}, [t("kind"), t("status"), t("risk"), t("description"), t("actions"), t("by")].map(h => el("th", {}, h)))),
    el(
      "tbody",
      {},
      d.matters.map(m =>
        el(
          "tr",
          {},
          el("td", {}, t(m.value.kind)),
          el("td", {}, t(m.value.status)),
          el("td", {}, m.value.risk || ""),
          el("td", { class: "notes" }, m.value.description || ""),
          el("td", {}, (m.value.actions || []).map(ac => el("div", { class: "meta" }, `${fmtTime(ac.at)} ${ac.by}: `, ac.text))),
          el("td", {}, who(m.created_by)),
        ),
      ),
    ),
  );

  const officers = (state.me.officers || []).filter(o => o.villages.includes(d.village)).map(o => o.name);
  const followUps = el(
    "table",
    { id: "follow-ups" },
    el("thead", {}, el("tr", {}, [t("task"), t("owner"), t("due"), t("status"), t("by"), ""].map(h => el("th", {}, h)))),
    el(
      "tbody",
      {},
      d.follow_ups.map(f => {
        const status = f.value.status;
        const owner = el("select", { name: "owner" }, officers.map(o => el("option", { value: o, selected: o === f.value.owner }, o)));
        const due = el("input", { type: "date", name: "due", value: f.value.due ? new Date(f.value.due).toISOString().slice(0, 10) : "" });
        const setBy = f.set_by?.status || f.created_by;
        return el(
          "tr",
          { dataset: { id: f.id, status } },
          el("td", {}, f.value.task),
          el("td", {}, state.me.officers?.length && !d.as_of ? owner : f.value.owner),
          el("td", {}, d.as_of ? fmtTime(f.value.due) : due),
          el("td", { class: "status" }, t(status), f.value.note ? el("div", { class: "meta" }, f.value.note) : ""),
          el("td", {}, who(setBy)),
          d.as_of ? el("td", {}) : el(
            "td",
            {},
            el("button", { class: "secondary", type: "button", onclick: () => patchFollowUp(d.id, f.id, { owner: owner.value || undefined, due_ms: due.value ? Date.parse(due.value) : undefined }).then(reload) }, t("save")),
            " ",
            status === "todo" ? el("button", { class: "secondary close", type: "button", onclick: () => patchFollowUp(d.id, f.id, { status: "done" }).then(reload) }, t("close")) : "",
          ),
        );
      }),
    ),
  );
  const newFollowUp = el(
    "form",
    { class: "filters", id: "new-follow-up" },
    el("label", {}, t("task"), el("input", { name: "task", required: true, size: 36 })),
    el("label", {}, t("owner"), el("select", { name: "owner", required: true }, officers.map(o => el("option", { value: o }, o)))),
    el("label", {}, t("due"), el("input", { name: "due", type: "date", required: true })),
    el("button", { class: "primary", type: "submit" }, t("create")),
  );
  newFollowUp.addEventListener("submit", async e => {
    e.preventDefault();
    const f = new FormData(newFollowUp);
    try {
      await api("POST", `/households/${encodeURIComponent(d.id)}/follow-ups`, { task: f.get("task"), owner: f.get("owner"), due_ms: Date.parse(f.get("due")) });
      toast(t("saved"));
      reload();
    } catch (err) {
      toast(`${t("failed")}: ${err.message}`);
    }
  });

  const conflicts = d.conflicts.length
    ? el(
        "table",
        { id: "conflicts" },
        el("thead", {}, el("tr", {}, [t("fields"), t("value"), t("by"), t("serverTime")].map(h => el("th", {}, h)))),
        el(
          "tbody",
          {},
          d.conflicts.flatMap(c =>
            c.values.map((x, i) =>
              el(
                "tr",
                { dataset: { path: c.path } },
                el("td", { title: c.path }, i === 0 ? fieldLabel(c.path, d) : ""),
                el("td", { class: "value" }, typeof x.value === "string" ? x.value : JSON.stringify(x.value)),
                el("td", { class: "author" }, who(x.author)),
                el("td", {}, fmtTime(x.author?.received_at_ms)),
              ),
            ),
          ),
        ),
      )
    : el("p", { class: "meta" }, t("noneYet"));

  const r = d.review;
  const comment = el("textarea", { name: "comment", rows: 2, cols: 50 });
  const reviewButton = (state_, label, id_) =>
    el(
      "button",
      {
        class: state_ === "approved" ? "primary" : "secondary",
        type: "button",
        id: id_,
        onclick: async () => {
          try {
            await api("POST", `/households/${encodeURIComponent(d.id)}/review`, { state: state_, comment: comment.value });
            toast(t("saved"));
            reload();
          } catch (err) {
            toast(`${t("failed")}: ${err.message}`);
          }
        },
      },
      label,
    );
  const review = el(
    "div",
    { class: "panel", id: "review" },
    el("h2", {}, t("review")),
    r.changed_since_approval
      ? el("div", { class: "banner warn", id: "changed-since" }, el("strong", {}, t("changedSince")), el("div", {}, `${t("changedFields")}: `, el("span", { id: "changed-fields", dataset: { paths: r.changed_fields.join(",") } }, r.changed_fields.map(f => fieldLabel(f, d)).join(", "))))
      : "",
    el("p", {}, `${t("reviewState")}: `, el("strong", { id: "review-state" }, t(r.state)), r.by ? ` · ${t("reviewedBy")} ${r.by} · ${fmtTime(r.at_ms)}` : ""),
    el("ul", {}, (r.comments || []).map(c => el("li", {}, `${fmtTime(c.at)} ${c.by}: `, c.text))),
    el("label", {}, t("comment"), el("br"), comment),
    el("p", {}, reviewButton("approved", t("approve"), "approve"), " ", reviewButton("has_issues", t("hasIssues"), "has-issues"), " ", reviewButton("rejected", t("reject"), "reject")),
  );

  const historyList = el(
    "table",
    { id: "history" },
    el("thead", {}, el("tr", {}, [t("serverTime"), t("by"), t("device"), t("fields"), ""].map(h => el("th", {}, h)))),
    el("tbody", {}, history.changes.map(c => el("tr", { dataset: { hash: c.hash } }, el("td", {}, fmtTime(c.author?.received_at_ms)), el("td", {}, who(c.author)), el("td", {}, c.author?.device || "—"), el("td", {}, el("code", {}, c.fields.join(", "))),
      el("td", {}, c.author?.received_at_ms ? el("a", { class: "then", href: `#/household/${encodeURIComponent(d.id)}?at=${c.author.received_at_ms}` }, t("viewThen")) : "")))),
  );
  // Shown as it was: say so, say what this version changed from the one before (the
  // changes the server received at that moment), and offer no edits (they would apply to
  // the record as it is now).
  const changedThen = d.as_of
    ? [...new Set(history.changes.filter(c => c.author?.received_at_ms === d.as_of.received_by_ms).flatMap(c => c.fields))]
    : [];
  const asOf = d.as_of
    ? el("div", { class: "banner warn", id: "as-of", dataset: { changesThen: d.as_of.changes_then } }, el("strong", {}, t("asOf")(fmtTime(d.as_of.received_by_ms), d.as_of.changes_then, d.as_of.changes_now)), " ",
        el("a", { href: `#/household/${encodeURIComponent(d.id)}` }, t("current")),
        changedThen.length ? el("div", {}, `${t("changedThen")}: `, el("code", { id: "changed-then" }, changedThen.join(", "))) : "")
    : "";

  return el(
    "section",
    { id: "detail", dataset: { id: d.id } },
    el("p", {}, el("a", { href: "#/households" }, t("back"))),
    el("h1", {}, [a.township, a.village, a.group, a.street, a.house_no ? `No. ${a.house_no}` : ""].filter(Boolean).join(" "), " ", el("span", { class: "badge" }, d.village)),
    asOf,
    d.possible_duplicates
      ? el("div", { class: "banner warn", id: "duplicates" }, el("strong", {}, t("duplicateHint")), " ",
          d.possible_duplicates.map(o => el("span", { class: "duplicate", dataset: { id: o } }, el("a", { href: `#/household/${encodeURIComponent(o)}` }, o.slice(0, 8)), " ", mayEdit ? mergeButton(o, t("mergeHere")) : "", " ")))
      : "",
    d.merged_into
      ? el("div", { class: "banner warn", id: "merged-into", dataset: { into: d.merged_into.into } }, el("strong", {}, t("mergedInto"), " "),
          el("a", { href: `#/household/${encodeURIComponent(d.merged_into.into)}` }, d.merged_into.into.slice(0, 8)),
          ` · ${d.merged_into.by} · ${fmtTime(d.merged_into.at_ms)}`,
          d.after_merge?.length ? el("div", { id: "after-merge" }, `${t("afterMerge")}: `, el("code", {}, d.after_merge.map(p => fieldLabel(p, d)).join(", "))) : "")
      : "",
    d.merged_from
      ? el("div", { class: "panel", id: "merged-from" }, el("h2", {}, t("mergedFrom")),
          el("ul", {}, d.merged_from.map(m => el("li", { dataset: { id: m.id, late: m.after_merge.length } },
            el("a", { href: `#/household/${encodeURIComponent(m.id)}` }, m.address_label || m.id), ` · ${m.merged_by} · ${fmtTime(m.merged_at_ms)}`,
            m.after_merge.length ? el("div", { class: "banner warn" }, `${t("afterMerge")}: `, el("code", {}, m.after_merge.join(", ")), " ", mayEdit ? mergeButton(m.id, t("mergeAgain"), true) : "") : ""))))
      : "",
    d.quarantine.length ? el("div", { class: "banner warn" }, el("strong", {}, t("quarantined")), el("ul", {}, d.quarantine.map(q => el("li", {}, q)))) : "",
    d.as_of ? "" : review,
    el("div", { class: "grid" }, el("div", { class: "panel" }, el("h2", {}, t("members")), members), el("div", { class: "panel" }, el("h2", {}, t("conflictsTitle")), conflicts)),
    el("div", { class: "panel" }, el("h2", {}, t("visitsTimeline")), visits,
      d.visits_next_offset != null ? el("p", { class: "muted" }, t("visitsShown")(d.visits.length, d.visits_total)) : ""),
    el("div", { class: "panel" }, el("h2", {}, t("matters")), matters),
    el("div", { class: "panel" }, el("h2", {}, t("followUps")), followUps, d.as_of ? "" : el("h2", {}, t("newFollowUp")), d.as_of ? "" : newFollowUp),
    el("div", { class: "panel" }, el("h2", {}, t("history")), historyList,
      history.next_offset != null ? el("p", { class: "muted" }, t("historyShown")(history.changes.length, history.total)) : ""),
  );
}

async function patchFollowUp(doc, id, body) {
  try {
    await api("PATCH", `/households/${encodeURIComponent(doc)}/follow-ups/${encodeURIComponent(id)}`, body);
    toast(t("saved"));
  } catch (err) {
    toast(`${t("failed")}: ${err.message}`);
  }
}

// ---- shell ------------------------------------------------------------------------------

function header() {
  document.documentElement.lang = state.lang === "zh" ? "zh-Hant" : "en";
  document.getElementById("lang").textContent = t("lang");
  const signout = document.getElementById("signout");
  signout.textContent = t("signout");
  signout.hidden = !state.me;
  document.getElementById("who").textContent = state.me ? `${state.me.user} · ${state.me.station}` : "";
  const nav = document.getElementById("nav");
  nav.replaceChildren();
  if (state.me) {
    const route = location.hash.split("?")[0];
    nav.append(
      el("a", { href: "#/", class: route === "#/" || route === "" ? "active" : "" }, t("dashboard")),
      el("a", { href: "#/households", class: route.startsWith("#/household") ? "active" : "" }, t("households")),
      el("a", { href: "#/report", class: route.startsWith("#/report") || route.startsWith("#/public") ? "active" : "" }, t("report")),
    );
  }
}

let rendering = 0;
async function render() {
  const ticket = ++rendering;
  header();
  const main = document.getElementById("main");
  if (!state.me) {
    main.replaceChildren(signInView());
    main.dataset.view = "signin";
    return;
  }
  const [route, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  let view;
  let name;
  try {
    if (route.startsWith("/household/")) {
      name = "detail";
      view = await detailView(decodeURIComponent(route.slice("/household/".length)), params);
    } else if (route.startsWith("/public")) {
      name = "public";
      view = await publicView(params);
    } else if (route.startsWith("/report")) {
      name = "report";
      view = await reportView(params);
    } else if (route.startsWith("/households")) {
      name = "list";
      view = await listView(params);
    } else {
      name = "dashboard";
      view = await dashboardView();
    }
  } catch (err) {
    name = "error";
    view = el("p", { class: "error" }, err.message);
  }
  if (ticket !== rendering) return; // a newer navigation won
  main.replaceChildren(view);
  main.dataset.view = name;
  main.dataset.rendered = String(ticket);
}

document.getElementById("lang").addEventListener("click", () => {
  state.lang = state.lang === "zh" ? "en" : "zh";
  localStorage.setItem("fieldsync.lang", state.lang);
  render();
});
document.getElementById("signout").addEventListener("click", signOut);
window.addEventListener("hashchange", render);
loadMe().then(render);
