// The spend dashboard. Reads /admin/usage, /admin/usage/daily and /admin/keys with the admin key,
// which lives only in this tab's sessionStorage and the Authorization header. Costs stay exact:
// they are read as the decimal text the API sent and added as BigInt nano-dollars, never as floats.
// All data goes into the page through textContent, never as HTML (user names come from callers).
"use strict";

(function () {
  const KEY_STORAGE = "gateway.adminKey";
  const NANOS_PER_USD = 1000000000n;
  const MAX_RANGE_DAYS = 3660;
  const CHART_GROUPS = 8; // more than this many groups: the rest are stacked as one "others" bar
  const COLORS = [
    "#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#64748b",
  ];

  const $ = (id) => document.getElementById(id);
  const state = {
    key: null,
    period: "7d",
    sort: { column: "estimated_cost", descending: true },
    view: null, // what is shown: {group, range, rows, daily}
    ticket: 0, // the latest load; answers to older loads are dropped
    chart: null,
  };

  class Refused extends Error {}

  // --- exact money -----------------------------------------------------------------------------

  // JSON.parse keeping each estimated_cost as the text the API sent (a float would round it).
  // Browsers without JSON.parse source text get the float printed back to its nine decimals,
  // which is the text the API sent for any amount under four million dollars.
  function parseExact(text) {
    return JSON.parse(text, function (key, value, context) {
      if (key !== "estimated_cost") return value;
      return context && typeof context.source === "string" ? context.source : value.toFixed(9);
    });
  }

  function toNanos(decimal) {
    const [whole, fraction = ""] = decimal.split(".");
    return BigInt(whole) * NANOS_PER_USD + BigInt((fraction + "000000000").slice(0, 9));
  }

  // The API's own form: no trailing zeros, no point for whole dollars.
  function usdText(nanos) {
    const fraction = (nanos % NANOS_PER_USD).toString().padStart(9, "0").replace(/0+$/, "");
    const whole = (nanos / NANOS_PER_USD).toString();
    return fraction ? `${whole}.${fraction}` : whole;
  }

  const costText = (row) => usdText(toNanos(row.estimated_cost));
  const count = (n) => Number(n).toLocaleString("en-US");

  // --- dates (the ledger's days are UTC days) ----------------------------------------------------

  const todayUtc = () => new Date().toISOString().slice(0, 10);

  function addDays(day, n) {
    const date = new Date(`${day}T00:00:00Z`);
    date.setUTCDate(date.getUTCDate() + n);
    return date.toISOString().slice(0, 10);
  }

  function daysFrom(first, last) {
    const days = [];
    for (let day = first; day <= last; day = addDays(day, 1)) days.push(day);
    return days;
  }

  // The chosen period as since (inclusive) and until (exclusive) dates, or null with a message.
  function chosenRange() {
    const today = todayUtc();
    let first;
    let last = today;
    if (state.period === "today") first = today;
    else if (state.period === "7d") first = addDays(today, -6);
    else if (state.period === "30d") first = addDays(today, -29);
    else {
      first = $("range-from").value;
      last = $("range-to").value;
      if (!first || !last) return fail("Choose both dates of the custom range.");
      if (first > last) return fail("The custom range starts after it ends.");
      if (Date.parse(last) - Date.parse(first) > MAX_RANGE_DAYS * 86400000) {
        return fail("Choose a custom range of at most ten years.");
      }
    }
    return { since: first, until: addDays(last, 1), first, last, days: daysFrom(first, last) };
  }

  function fail(message) {
    $("status").textContent = message;
    return null;
  }

  // --- the admin API -------------------------------------------------------------------------------

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}), Authorization: `Bearer ${state.key}` };
    const response = await fetch(path, { ...options, headers, cache: "no-store" });
    if (response.status === 401) {
      signOut("The admin key was refused. Sign in again.");
      throw new Refused();
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    return response;
  }

  async function errorMessage(response) {
    try {
      return (await response.json()).error.message;
    } catch {
      return `The gateway answered ${response.status}.`;
    }
  }

  // Runs an action from a click or a form; shows its error instead of leaving it to the console.
  function guarded(action, where = "status") {
    return async (event) => {
      if (event && event.preventDefault) event.preventDefault();
      $(where).textContent = "";
      try {
        await action(event);
      } catch (error) {
        if (!(error instanceof Refused)) $(where).textContent = error.message;
      }
    };
  }

  // --- signing in and out ----------------------------------------------------------------------

  async function signIn(key) {
    const headers = { Authorization: `Bearer ${key}` };
    const response = await fetch("/admin/keys", { headers, cache: "no-store" });
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      $("login-error").textContent = "That admin key was refused.";
      return;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("admin-key").value = "";
    $("login").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    renderKeys((await response.json()).data);
    document.querySelector("[data-period][aria-pressed=true]").focus();
    await guarded(loadUsage)();
  }

  function signOut(message = "") {
    state.key = null;
    state.view = null;
    state.ticket += 1; // answers to loads begun before are dropped
    sessionStorage.removeItem(KEY_STORAGE);
    if (state.chart) state.chart.destroy();
    state.chart = null;
    $("app").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message;
    $("new-key-value").textContent = "";
    $("new-key").hidden = true;
    $("admin-key").focus();
  }

  // --- usage: totals, chart, table -------------------------------------------------------------

  async function loadUsage() {
    const range = chosenRange();
    if (!range) return;
    const group = $("group-by").value;
    const ticket = ++state.ticket;
    const params = new URLSearchParams({ group_by: group, since: range.since, until: range.until });
    $("app").setAttribute("aria-busy", "true");
    try {
      const [usage, daily] = await Promise.all([
        api(`/admin/usage?${params}`),
        api(`/admin/usage/daily?${params}`),
      ]);
      const rows = parseExact(await usage.text()).data;
      const days = parseExact(await daily.text()).data;
      if (ticket !== state.ticket) return; // a newer choice is loading
      state.view = { group, range, rows, daily: days };
      renderUsage();
    } catch (error) {
      if (ticket === state.ticket) throw error; // else a newer load speaks for the page
    } finally {
      if (ticket === state.ticket) $("app").setAttribute("aria-busy", "false");
    }
  }

  function renderUsage() {
    const { group, range, rows } = state.view;
    for (const element of document.querySelectorAll(".group-name")) element.textContent = group;
    $("period-label").textContent = range.first === range.last ? range.first : `${range.first} → ${range.last}`;
    let requests = 0;
    let prompt = 0;
    let completion = 0;
    let tokens = 0;
    let nanos = 0n;
    for (const row of rows) {
      requests += row.requests;
      prompt += row.prompt_tokens;
      completion += row.completion_tokens;
      tokens += row.total_tokens;
      nanos += toNanos(row.estimated_cost);
    }
    $("total-cost").textContent = `$${usdText(nanos)}`;
    $("total-requests").textContent = count(requests);
    $("total-tokens").textContent = count(tokens);
    $("total-prompt-tokens").textContent = count(prompt);
    $("total-completion-tokens").textContent = count(completion);
    renderTable();
    renderChart();
  }

  const CSV_COLUMNS = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_cost"];
  // Quoted when it holds a comma, a quote or a line break, quotes doubled (RFC 4180, as Python's csv).
  // As the API's CSV: a name a spreadsheet would run as a formula gets a leading ' (shown as text).
  const spreadsheetSafe = (name) => (/^[=+\-@\t\r]/.test(name) ? `'${name}` : name);
  const csvField = (text) => (/[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text);

  const groupLabel = (name) => (name === null || name === undefined ? "(none)" : String(name));

  function compareRows(column) {
    if (column === "group") return (a, b) => groupLabel(a.group).localeCompare(groupLabel(b.group));
    if (column === "estimated_cost") {
      return (a, b) => {
        const x = toNanos(a.estimated_cost);
        const y = toNanos(b.estimated_cost);
        return x < y ? -1 : x > y ? 1 : 0;
      };
    }
    return (a, b) => a[column] - b[column];
  }

  // The rows in the table's order, each with its group's value as `group`.
  function sortedRows() {
    const { group, rows } = state.view;
    const { column, descending } = state.sort;
    const compare = compareRows(column);
    return rows
      .map((row) => ({ ...row, group: row[group] }))
      .sort((a, b) => (descending ? -compare(a, b) : compare(a, b)));
  }

  function renderTable() {
    const { rows } = state.view;
    const { column, descending } = state.sort;
    const sorted = sortedRows();
    const body = document.querySelector("#usage-table tbody");
    body.replaceChildren(
      ...sorted.map((row) => {
        const tr = document.createElement("tr");
        const name = cell(groupLabel(row.group));
        if (row.group === null) name.classList.add("muted");
        tr.append(
          name,
          cell(count(row.requests), "num"),
          cell(count(row.prompt_tokens), "num"),
          cell(count(row.completion_tokens), "num"),
          cell(count(row.total_tokens), "num"),
          cell(`$${costText(row)}`, "num"),
        );
        return tr;
      }),
    );
    $("usage-empty").hidden = rows.length > 0;
    for (const button of document.querySelectorAll("#usage-table th button")) {
      const th = button.parentElement;
      if (button.dataset.sort === column) th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    }
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function sortBy(column) {
    const same = state.sort.column === column;
    state.sort = { column, descending: same ? !state.sort.descending : column !== "group" };
    if (state.view) renderTable();
  }

  // --- the chart: one bar a day, stacked by group ------------------------------------------------

  const MEASURES = {
    cost: { of: (row) => Number(row.estimated_cost), format: (v) => `$${formatDollars(v)}` },
    tokens: { of: (row) => row.total_tokens, format: (v) => count(Math.round(v)) },
    requests: { of: (row) => row.requests, format: (v) => count(Math.round(v)) },
  };

  function formatDollars(v) {
    return Math.abs(v) >= 1 ? v.toFixed(2) : String(Number(v.toPrecision(3)));
  }

  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const isoDay = (ts) => new Date(ts * 1000).toISOString().slice(0, 10);
  const dayLabel = (ts) => `${MONTHS[Number(isoDay(ts).slice(5, 7)) - 1]} ${Number(isoDay(ts).slice(8))}`;
  // Room for the longest tick label (uPlot asks with the labels it is about to draw).
  const axisSize = (u, labels) => (labels ? Math.max(...labels.map((label) => label.length)) * 7 + 20 : 50);

  // Per-group values per day, as floats: they are bar heights and legend figures only (every exact
  // figure is in the totals and the table). Groups are told apart by their value (null included),
  // so a user named "others" or "(none)" keeps a bar of its own.
  function chartSeries(view, measure) {
    const { group, range, daily } = view;
    const of = MEASURES[measure].of;
    const byGroup = new Map();
    for (const row of daily) byGroup.set(row[group], (byGroup.get(row[group]) || 0) + of(row));
    const ranked = [...byGroup.entries()].sort((a, b) => b[1] - a[1]).map(([value]) => value);
    const shown = ranked.length > CHART_GROUPS + 1 ? ranked.slice(0, CHART_GROUPS) : ranked;
    const names = shown.map(groupLabel);
    if (ranked.length > shown.length) names.push(`${ranked.length - shown.length} others`);
    const slot = new Map(shown.map((value, i) => [value, i]));
    const dayIndex = new Map(range.days.map((day, i) => [day, i]));
    const values = names.map(() => new Array(range.days.length).fill(0));
    for (const row of daily) {
      const day = dayIndex.get(row.day);
      if (day === undefined) continue;
      values[slot.has(row[group]) ? slot.get(row[group]) : names.length - 1][day] += of(row);
    }
    return { names, values };
  }

  function renderChart() {
    const measure = $("chart-measure").value;
    const { names, values } = chartSeries(state.view, measure);
    const format = MEASURES[measure].format;
    const xs = state.view.range.days.map((day) => Date.parse(`${day}T00:00:00Z`) / 1000);
    // Stacked bars: each series is drawn as the running sum up to it, tallest first, so the
    // shorter sums paint over it and each group shows as its own band.
    const stacked = [];
    let running = new Array(xs.length).fill(0);
    for (const own of values) {
      running = running.map((sum, i) => sum + own[i]);
      stacked.push(running);
    }
    const order = names.map((_, i) => i).reverse();
    const bars = uPlot.paths.bars({ size: [0.7, 80] });
    const options = {
      width: chartWidth(),
      height: 300,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      scales: {
        x: { time: true, range: (u, min, max) => [min - 43200, max + 43200] },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
      },
      axes: [
        {
          incrs: [86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400],
          values: (u, splits) => splits.map(dayLabel),
        },
        { values: (u, splits) => splits.map(format), size: axisSize },
      ],
      cursor: { points: { show: false } },
      series: [
        { label: "day", value: (u, ts) => (ts == null ? "period" : isoDay(ts)) },
        ...order.map((i) => ({
          label: names[i],
          fill: COLORS[i % COLORS.length],
          stroke: COLORS[i % COLORS.length],
          width: 0,
          paths: bars,
          points: { show: false },
          // At the cursor: that day's value; elsewhere: the period's.
          value: (u, v, series, index) =>
            format(index == null ? values[i].reduce((sum, x) => sum + x, 0) : values[i][index]),
        })),
      ],
    };
    if (state.chart) state.chart.destroy();
    const container = $("chart");
    container.replaceChildren();
    state.chart = new uPlot(options, [xs, ...order.map((i) => stacked[i])], container);
  }

  const chartWidth = () => Math.max(320, $("chart").clientWidth);

  // --- keys: issue (shown once), list, revoke ----------------------------------------------------

  async function loadKeys() {
    renderKeys((await (await api("/admin/keys")).json()).data);
  }

  function renderKeys(keys) {
    const body = document.querySelector("#keys-table tbody");
    body.replaceChildren(
      ...keys.map((key) => {
        const tr = document.createElement("tr");
        const revoked = key.revoked_at !== null;
        tr.append(
          cell(key.name),
          cell(key.source === "config" ? "config file" : "issued"),
          cell(key.created_at ? shortTime(key.created_at) : "–"),
          cell(revoked ? `revoked ${shortTime(key.revoked_at)}` : "active", revoked ? "muted" : ""),
        );
        const action = document.createElement("td");
        if (key.source === "issued" && !revoked) action.append(revokeButton(key.name));
        tr.append(action);
        return tr;
      }),
    );
  }

  const shortTime = (iso) => iso.slice(0, 16).replace("T", " ");

  // Two clicks to revoke: the first asks, the second does it (no blocking confirm() dialog).
  function revokeButton(name) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "quiet";
    button.textContent = "Revoke";
    button.setAttribute("aria-label", `Revoke ${name}`);
    let timer = null;
    const ask = (asking) => {
      button.textContent = asking ? "Confirm revoke" : "Revoke";
      button.setAttribute("aria-label", asking ? `Confirm: revoke ${name}` : `Revoke ${name}`);
      button.classList.toggle("danger", asking);
    };
    button.addEventListener(
      "click",
      guarded(async () => {
        if (!timer) {
          ask(true);
          timer = setTimeout(() => {
            timer = null;
            ask(false);
          }, 5000);
          return;
        }
        clearTimeout(timer);
        button.disabled = true;
        try {
          await api(`/admin/keys/${encodeURIComponent(name)}`, { method: "DELETE" });
        } finally {
          button.disabled = false;
        }
        await loadKeys();
        $("issue-name").focus(); // the button is gone with its row
      }, "keys-error"),
    );
    return button;
  }

  async function issueKey() {
    const name = $("issue-name").value.trim();
    const response = await api("/admin/keys", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name }),
    });
    const issued = await response.json();
    $("issue-name").value = "";
    $("new-key-name").textContent = issued.name;
    $("new-key-value").textContent = issued.key;
    $("new-key-copy").textContent = "Copy";
    $("new-key").hidden = false;
    await loadKeys();
  }

  async function copyNewKey() {
    try {
      await navigator.clipboard.writeText($("new-key-value").textContent);
      $("new-key-copy").textContent = "Copied";
    } catch {
      getSelection().selectAllChildren($("new-key-value"));
      $("new-key-copy").textContent = "Press Ctrl+C to copy";
    }
  }

  function hideNewKey() {
    $("new-key-value").textContent = "";
    $("new-key").hidden = true;
  }

  // --- wiring ------------------------------------------------------------------------------------

  function choosePeriod(period) {
    state.period = period;
    for (const button of document.querySelectorAll("[data-period]")) {
      button.setAttribute("aria-pressed", String(button.dataset.period === period));
    }
    $("custom-range").hidden = period !== "custom";
    if (period === "custom") {
      if (!$("range-to").value) $("range-to").value = todayUtc();
      if (!$("range-from").value) $("range-from").value = addDays(todayUtc(), -6);
    }
    return loadUsage();
  }

  function start() {
    $("login-form").addEventListener(
      "submit",
      guarded(() => signIn($("admin-key").value.trim()), "login-error"),
    );
    $("sign-out").addEventListener("click", () => signOut());
    for (const button of document.querySelectorAll("[data-period]")) {
      button.addEventListener("click", guarded(() => choosePeriod(button.dataset.period)));
    }
    $("custom-range").addEventListener("submit", guarded(loadUsage));
    $("group-by").addEventListener("change", guarded(loadUsage));
    $("chart-measure").addEventListener("change", () => state.view && renderChart());
    $("refresh").addEventListener("click", guarded(() => Promise.all([loadUsage(), loadKeys()])));
    for (const button of document.querySelectorAll("#usage-table th button")) {
      button.addEventListener("click", () => sortBy(button.dataset.sort));
    }
    $("download-csv").addEventListener("click", guarded(downloadCsv));
    $("issue-form").addEventListener("submit", guarded(issueKey, "keys-error"));
    $("new-key-copy").addEventListener("click", copyNewKey);
    $("new-key-hide").addEventListener("click", hideNewKey);
    window.addEventListener("resize", () => {
      if (state.chart) state.chart.setSize({ width: chartWidth(), height: 300 });
    });

    for (const button of document.querySelectorAll("[data-period]")) {
      button.setAttribute("aria-pressed", String(button.dataset.period === state.period));
    }
    const stored = sessionStorage.getItem(KEY_STORAGE);
    if (stored) guarded(() => signIn(stored), "login-error")();
    else $("admin-key").focus();
  }

  // The CSV of what is shown: the table's rows in its order, with the columns and the exact
  // figures of the API's CSV (`/admin/usage?format=csv`), saved from a Blob (no URL carries data).
  function downloadCsv() {
    if (!state.view) return;
    const { group, range } = state.view;
    const lines = [[group, ...CSV_COLUMNS].join(",")];
    for (const row of sortedRows()) {
      const counts = CSV_COLUMNS.slice(0, -1).map((column) => row[column]);
      lines.push([csvField(spreadsheetSafe(row.group ?? "")), ...counts, costText(row)].join(","));
    }
    const url = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
    const link = document.createElement("a");
    link.href = url;
    link.download = `usage-by-${group}-${range.first}-to-${range.last}.csv`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  start();
})();
