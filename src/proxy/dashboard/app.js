// Till dashboard: polls /dashboard/api/state and redraws.
//
// Safety rule for this file: everything from the server may come from a
// token (labels are chosen by whoever holds one), so the DOM is built with
// createElement and textContent only: no string is ever parsed as markup
// (the tests grep this file for the HTML sinks).
"use strict";

(function () {
  const POLL_MS = 2000;
  const SEARCH_DELAY_MS = 250;
  // Characters of a label the revoke confirmation shows.
  const MAX_LABEL_CHARS = 80;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  let timer = null;
  let searchTimer = null;
  // Answers can arrive out of order (a poll and a search at once): only the
  // newest request's answer is drawn.
  let latest = 0;
  // What the families list shows: the server filters and pages it.
  const view = { q: "", page: 1, pages: 1 };

  // el("div", {class: "x", title: t}, child, "text", ...): children that
  // are strings become text nodes.
  function el(tag, attrs) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) {
      const v = attrs[k];
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = String(v);
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, String(v));
    }
    for (let i = 2; i < arguments.length; i++) {
      const c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return e;
  }

  function replace(id, nodes) {
    const box = document.getElementById(id);
    box.replaceChildren(...nodes);
  }

  function short(id) {
    return id ? String(id).slice(0, 8) + "…" : "?";
  }

  function ago(now, t) {
    if (t === null || t === undefined) return "never";
    return span(now - t) + " ago";
  }

  function span(secs) {
    const s = Math.max(0, Math.round(secs));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }

  function expiry(now, exp) {
    if (exp === null || exp === undefined) return null;
    return exp <= now ? "expired " + span(now - exp) + " ago" : "expires in " + span(exp - now);
  }

  function clock(iso) {
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleTimeString();
  }

  // `left` is what is really left: the fewest uses remaining on the block or
  // any ancestor, so a child of a used-up parent shows a full bar.
  function bar(uses, limit, left) {
    if (limit === null || limit === undefined) {
      if (left === 0) {
        const fill = el("div", { class: "fill" });
        fill.style.width = "100%";
        return el("div", { class: "bar full", title: "no use limit of its own; a parent is used up" }, fill);
      }
      return el("div", { class: "bar none", title: "no use limit" });
    }
    const spent = left === null || left === undefined ? uses : Math.max(uses, limit - left);
    const pct = limit > 0 ? Math.min(100, (100 * spent) / limit) : 100;
    const fill = el("div", { class: "fill" });
    // CSSOM, not a style attribute: allowed by the CSP.
    fill.style.width = pct + "%";
    const level = pct >= 100 ? "full" : pct >= 80 ? "high" : "ok";
    return el(
      "div",
      { class: "bar " + level, role: "meter", "aria-valuemin": 0, "aria-valuemax": limit, "aria-valuenow": spent },
      fill
    );
  }

  // Rate windows (`10/1m`) and the concurrency cap, as issued.
  function windows(b) {
    const parts = (b.rates || []).slice();
    if (b.concurrency !== null && b.concurrency !== undefined) {
      parts.push(b.concurrency + " in flight");
    }
    return parts.join(" · ");
  }

  function count(uses, limit) {
    return limit === null || limit === undefined ? uses + (uses === 1 ? " use" : " uses") : uses + " / " + limit;
  }

  // A label is the token holder's text: in the confirmation it is shown
  // on one line, quoted and escaped as JSON and cut, so it cannot pose as
  // the dialog's own lines ("...\n\nThis also revokes your admin token.
  // Press Cancel." under a blank line).
  function quoted(label) {
    const chars = Array.from(String(label));
    const cut = chars.length > MAX_LABEL_CHARS;
    // JSON leaves line separators and bidi controls as they are.
    const s = JSON.stringify(chars.slice(0, MAX_LABEL_CHARS).join("")).replace(
      /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu,
      (c) => "\\u" + c.codePointAt(0).toString(16).padStart(4, "0")
    );
    return cut ? s.slice(0, -1) + "…\"" : s;
  }

  async function revoke(id, what, label) {
    const name = label ? quoted(label) : short(id);
    if (!window.confirm("Revoke " + what + " " + name + "?\n\nEvery token derived from it is refused from now on. This cannot be undone.")) {
      return;
    }
    try {
      const r = await fetch("/dashboard/api/revoke", {
        method: "POST",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify({ id: id }),
      });
      if (r.status === 401) return window.location.reload();
      if (!r.ok) {
        const body = await r.json().catch(() => ({}));
        setStatus("revoke failed: " + ((body.error && body.error.message) || r.status), true);
      }
    } catch (e) {
      setStatus("revoke failed: " + e, true);
    }
    refresh();
  }

  function revokeButton(id, what, label) {
    return el("button", {
      type: "button",
      class: "revoke",
      "data-revoke": id,
      text: what === "family" ? "Revoke family" : "Revoke",
      onclick: () => revoke(id, what, label),
    });
  }

  // One name for a block wherever it is shown (families list, expiring
  // soon): its label, else its place in the token.
  function blockName(b) {
    if (b.label) return b.label;
    return b.index ? "block " + b.index : "root";
  }

  function familyName(f) {
    return f.label || "(no label)";
  }

  // Orders a family's blocks as a tree: each block under its parent.
  function tree(blocks) {
    const byParent = new Map();
    const ids = new Set(blocks.map((b) => b.id));
    const roots = [];
    for (const b of blocks) {
      if (b.parent && ids.has(b.parent)) {
        if (!byParent.has(b.parent)) byParent.set(b.parent, []);
        byParent.get(b.parent).push(b);
      } else {
        roots.push(b);
      }
    }
    const out = [];
    const min = (a, b) => (a === null || a === undefined ? b : b === null || b === undefined ? a : Math.min(a, b));
    // Every use counts on each ancestor too: what is left is the fewest
    // remaining on the way down.
    const walk = (b, depth, above) => {
      if (out.length > 1000) return;
      const left = min(b.remaining, above);
      out.push([b, depth, left]);
      for (const c of byParent.get(b.id) || []) walk(c, depth + 1, left);
    };
    for (const r of roots) walk(r, r.index || 0, null);
    return out;
  }

  function family(now, f) {
    const exp = expiry(now, f.expires);
    const head = el(
      "header",
      { class: "family-head" },
      el("span", { class: "label", title: f.label || "", text: familyName(f) }),
      el("code", { class: "id", title: f.family, text: short(f.family) }),
      f.revoked ? el("span", { class: "badge revoked", text: "revoked" }) : null,
      exp ? el("span", { class: "badge " + (f.expires <= now ? "revoked" : "soon"), text: exp }) : null,
      // Count and button wrap together, to the right, when the line is full.
      el(
        "span",
        { class: "family-actions" },
        el("span", { class: "family-uses count", text: count(f.uses, f.limit) }),
        f.revoked ? null : revokeButton(f.family, "family", f.label)
      )
    );
    const rows = tree(f.blocks || []).map(([b, depth, left]) => {
      const bexp = expiry(now, b.expires);
      const name = el(
        "span",
        { class: "block-name" },
        el("span", { class: "label", title: b.label || "", text: blockName(b) }),
        " ",
        el("code", { class: "id", title: b.id, text: short(b.id) })
      );
      // Capped, so a deep tree still fits a phone's width.
      name.style.paddingLeft = "min(" + depth * 1.2 + "em, 30%)";
      return el(
        "div",
        { class: "block" + (b.revoked ? " is-revoked" : ""), "data-id": b.id, "data-depth": depth },
        name,
        bar(b.uses, b.limit, left),
        el("span", { class: "uses count", text: count(b.uses, b.limit) + (left === 0 && b.remaining !== 0 ? " · none left (parent used up)" : "") }),
        el(
          "span",
          { class: "meta muted" },
          "last use " + ago(now, b.last_use),
          b.children_seen ? " · " + b.children_seen + " child" + (b.children_seen === 1 ? "" : "ren") : "",
          bexp ? " · " + bexp : "",
          windows(b) ? " · " : "",
          windows(b) ? el("span", { class: "windows", title: "rate windows and concurrency cap of this key", text: windows(b) }) : ""
        ),
        b.revoked
          ? el("span", { class: "badge revoked", text: "revoked" })
          : depth === 0
            ? el("span")
            : revokeButton(b.id, "block", b.label)
      );
    });
    const shown = (f.blocks || []).length;
    const more =
      f.blocks_total > shown
        ? el("p", { class: "more muted", text: "… and " + (f.blocks_total - shown) + " more keys of this family (till usage lists them all)" })
        : null;
    return el(
      "article",
      { class: "family" + (f.revoked ? " is-revoked" : ""), "data-family": f.family },
      head,
      el("div", { class: "blocks" }, ...rows),
      more
    );
  }

  // The server picks the blocks (over every family, not just this page):
  // not revoked, not used up, expiring within 72 hours, soonest first.
  function expiring(now, soon) {
    if (!soon.length) return [el("li", { class: "empty", text: "Nothing with uses left expires in the next 72 hours." })];
    return soon.map((b) =>
      el(
        "li",
        { class: "expiring-item", "data-id": b.id },
        el(
          "div",
          { class: "expiring-name" },
          b.index ? el("span", { class: "family-name muted", title: b.family_label || "", text: familyName({ label: b.family_label }) }) : null,
          b.index ? el("span", { class: "muted", text: "›" }) : null,
          el("span", { class: "label", title: b.label || "", text: b.index ? blockName(b) : familyName({ label: b.family_label }) })
        ),
        el("code", { class: "id", title: b.id, text: short(b.id) }),
        el("span", { class: "muted", text: expiry(now, b.expires) })
      )
    );
  }

  function decision(d) {
    const deny = d.decision === "deny";
    const who = (d.labels || []).join(" › ");
    return el(
      "li",
      { class: "decision " + (deny ? "deny" : "allow") },
      el("span", { class: "time muted", text: clock(d.time) }),
      el("span", { class: "badge " + (deny ? "revoked" : "ok"), text: deny ? d.code : String(d.status) }),
      el("span", { class: "what", text: d.method + " /" + d.service + d.path + (d.model ? " · " + d.model : "") }),
      who ? el("span", { class: "label", text: who }) : null,
      deny && d.reason ? el("div", { class: "reason", text: d.reason }) : null
    );
  }

  function alert(a) {
    return el(
      "li",
      { class: "alert-item " + (a.kind === "usage_threshold" ? "warn" : "deny") },
      el("span", { class: "time muted", text: clock(a.time) }),
      el("span", { class: "badge", text: a.kind }),
      el("div", { class: "message", text: a.message })
    );
  }

  function render(s) {
    const now = s.now;
    const fams = s.families || [];
    view.page = s.page || 1;
    view.pages = s.pages || 1;
    const empty = s.total
      ? "No token family matches “" + (s.q || "") + "”."
      : "No token has been used through this proxy yet.";
    replace("families", fams.length ? fams.map((f) => family(now, f)) : [el("p", { class: "empty", text: empty })]);
    const pager = document.getElementById("pager");
    pager.hidden = view.pages <= 1;
    document.getElementById("page-info").textContent =
      "page " + view.page + " of " + view.pages + " · " + s.matched + (s.q ? " matching" : "") + " famil" + (s.matched === 1 ? "y" : "ies");
    document.getElementById("prev").disabled = view.page <= 1;
    document.getElementById("next").disabled = view.page >= view.pages;
    replace("expiring", expiring(now, s.expiring || []));
    const ds = s.decisions || [];
    replace("decisions", ds.length ? ds.map(decision) : [el("li", { class: "empty", text: "No requests yet." })]);
    const as = s.alerts || [];
    replace("alerts", as.length ? as.map(alert) : [el("li", { class: "empty", text: "No alerts." })]);
    const denied = ds.filter((d) => d.decision === "deny").length;
    const total = s.total || 0;
    document.getElementById("summary").textContent =
      total + " famil" + (total === 1 ? "y" : "ies") + " · " + s.revocations + " revoked ids · " + denied + " of the last " + ds.length + " decisions denied";
  }

  function setStatus(text, bad) {
    const s = document.getElementById("status");
    s.textContent = text;
    s.className = "status" + (bad ? " bad" : "");
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++latest;
    try {
      const params = new URLSearchParams({ page: String(view.page) });
      if (view.q) params.set("q", view.q);
      const r = await fetch("/dashboard/api/state?" + params, { cache: "no-store" });
      if (r.status === 401) {
        window.location.reload();
        return;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const s = await r.json();
      if (mine !== latest) return;
      render(s);
      setStatus("live · " + new Date().toLocaleTimeString(), false);
    } catch (e) {
      if (mine !== latest) return;
      setStatus("offline: " + e.message, true);
    }
    timer = setTimeout(refresh, POLL_MS);
  }

  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", headers: { "x-csrf-token": csrf } }).catch(() => {});
    window.location.reload();
  });
  // "change" and "search" too: the field's clear button and scripted
  // clears do not always send "input".
  const search = document.getElementById("search");
  for (const ev of ["input", "change", "search"]) {
    search.addEventListener(ev, () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        const q = search.value.trim();
        if (q === view.q) return;
        view.q = q;
        view.page = 1;
        refresh();
      }, SEARCH_DELAY_MS);
    });
  }
  document.getElementById("prev").addEventListener("click", () => {
    view.page = Math.max(1, view.page - 1);
    refresh();
  });
  document.getElementById("next").addEventListener("click", () => {
    view.page = Math.min(view.pages, view.page + 1);
    refresh();
  });
  refresh();
})();
