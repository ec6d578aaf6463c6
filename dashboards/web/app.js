// surgeflow's built-in dashboard: fetches /api/overview every 5 s and draws it with hand-written
// SVG. No framework, no asset from outside. Every visible label comes from I18N below.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const FETCH_TIMEOUT_MS = 10000;
  const LANG_KEY = "surgeflow.dashboard.lang";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DASH = "–";

  // ---- labels: the one dictionary -------------------------------------------------------------
  const I18N = {
    zh: {
      title: "surgeflow 实时营销看板",
      language: "语言",
      langZh: "中文",
      langEn: "EN",
      asOf: "数据截至",
      updated: "更新于",
      queryMs: "查询 {ms} 毫秒",
      waiting: "等待数据…",
      waitingStamp: "等待第一分钟的数据",
      fetchError: "更新失败（{msg}），显示上次数据，{s} 秒后重试",
      events: "事件数",
      users: "独立用户",
      orders: "订单数",
      revenue: "收入",
      firingAlerts: "告警中",
      lastHours: "近 {h} 小时",
      amongRecent: "最近的告警中",
      traffic: "每分钟流量（按渠道）",
      trafficSub: "近 {m} 分钟 · 事件数 · {tz}",
      total: "合计",
      funnel: "转化漏斗",
      funnelSub: "近 {h} 小时 · 独立用户",
      step_viewed: "浏览商品",
      step_carted: "加入购物车",
      step_checked_out: "开始结账",
      step_ordered: "完成订单",
      stepRate: "上一步的 {p}",
      overallRate: "浏览 → 下单：{p}",
      campaigns: "营销活动 KPI",
      campaignsSub: "近 {h} 小时 · 按收入排序",
      organic: "（自然流量）",
      col_campaign: "活动",
      col_channel: "渠道",
      col_impressions: "曝光",
      col_clicks: "点击",
      col_ctr: "点击率",
      col_orders: "订单",
      col_cvr: "转化率",
      col_revenue: "收入",
      col_cost: "花费",
      col_roi: "ROI",
      col_cpc: "CPC",
      col_cpa: "CPA",
      col_aov: "客单价",
      col_viewed: "浏览",
      col_ordered: "下单",
      col_view_to_order: "转化",
      alerts: "最近告警",
      alertsSub: "动态阈值 μ ± kσ",
      col_rule: "规则",
      col_series: "序列",
      col_severity: "级别",
      col_status: "状态",
      col_value: "值",
      col_mu: "μ",
      col_sigma: "σ",
      col_z: "z",
      col_baseline: "基线",
      col_first_seen: "首次出现",
      status_firing: "告警中",
      status_resolved: "已恢复",
      noAlerts: "暂无告警",
      actions: "最近触达动作",
      actionsSub: "触发规则",
      models: "在线模型",
      modelsSub: "滚动 ROC AUC、对数损失、校准（按标签分钟）",
      col_model: "模型",
      col_auc: "AUC",
      col_log_loss: "对数损失",
      col_calibration: "校准",
      col_labels: "标签",
      col_label_delay: "延迟 秒",
      col_updated: "更新",
      noModels: "暂无标签",
      col_time: "时间",
      col_user: "用户",
      noActions: "暂无动作",
      noRows: "暂无数据",
      ch_ad: "广告",
      ch_app: "应用",
      ch_web: "网页",
      ch_mini_program: "小程序",
      ch_all: "全部渠道",
      ch_sms: "短信",
      ch_email: "邮件",
      ch_push: "推送",
      ch_store: "门店",
      ch_: "（无渠道）",
    },
    en: {
      title: "surgeflow live marketing dashboard",
      language: "Language",
      langZh: "中文",
      langEn: "EN",
      asOf: "as of",
      updated: "updated",
      queryMs: "queries {ms} ms",
      waiting: "waiting for data…",
      waitingStamp: "waiting for the first minute of data",
      fetchError: "update failed ({msg}); showing the last data, retrying in {s} s",
      events: "Events",
      users: "Unique users",
      orders: "Orders",
      revenue: "Revenue",
      firingAlerts: "Firing alerts",
      lastHours: "last {h} h",
      amongRecent: "among recent alerts",
      traffic: "Traffic per minute by channel",
      trafficSub: "last {m} min · events · {tz}",
      total: "Total",
      funnel: "Conversion funnel",
      funnelSub: "last {h} h · unique users",
      step_viewed: "Product viewed",
      step_carted: "Added to cart",
      step_checked_out: "Checkout started",
      step_ordered: "Order completed",
      stepRate: "{p} of previous step",
      overallRate: "View → order: {p}",
      campaigns: "Campaign KPIs",
      campaignsSub: "last {h} h · by revenue",
      organic: "(organic)",
      col_campaign: "Campaign",
      col_channel: "Channel",
      col_impressions: "Impr.",
      col_clicks: "Clicks",
      col_ctr: "CTR",
      col_orders: "Orders",
      col_cvr: "CVR",
      col_revenue: "Revenue",
      col_cost: "Cost",
      col_roi: "ROI",
      col_cpc: "CPC",
      col_cpa: "CPA",
      col_aov: "AOV",
      col_viewed: "Viewed",
      col_ordered: "Ordered",
      col_view_to_order: "Conv.",
      alerts: "Recent alerts",
      alertsSub: "dynamic thresholds μ ± kσ",
      col_rule: "Rule",
      col_series: "Series",
      col_severity: "Sev.",
      col_status: "Status",
      col_value: "Value",
      col_mu: "μ",
      col_sigma: "σ",
      col_z: "z",
      col_baseline: "Baseline",
      col_first_seen: "First seen",
      status_firing: "firing",
      status_resolved: "resolved",
      noAlerts: "no alerts",
      actions: "Recent actions",
      actionsSub: "trigger rules",
      models: "Online models",
      modelsSub: "rolling ROC AUC, log loss, calibration (label minutes)",
      col_model: "Model",
      col_auc: "AUC",
      col_log_loss: "Log loss",
      col_calibration: "Calib.",
      col_labels: "Labels",
      col_label_delay: "Delay s",
      col_updated: "Updated",
      noModels: "no labels yet",
      col_time: "Time",
      col_user: "User",
      noActions: "no actions",
      noRows: "no data",
      ch_ad: "Ads",
      ch_app: "App",
      ch_web: "Web",
      ch_mini_program: "Mini program",
      ch_all: "All channels",
      ch_sms: "SMS",
      ch_email: "E-mail",
      ch_push: "Push",
      ch_store: "Store",
      ch_: "(no channel)",
    },
  };
  const LOCALES = { zh: "zh-CN", en: "en-US" };
  const CHANNEL_COLORS = {
    ad: "#4e79a7", app: "#f28e2b", web: "#e15759", mini_program: "#76b7b2", sms: "#59a14f",
    email: "#edc948", push: "#b07aa1", store: "#ff9da7",
  };
  const SPARE_COLORS = ["#9c755f", "#bab0ac", "#86bcb6", "#d37295", "#8cd17d", "#499894"];
  const STEPS = [
    ["viewed", null], ["carted", "view_to_cart"], ["checked_out", "cart_to_checkout"],
    ["ordered", "checkout_to_order"],
  ];

  const state = { lang: pickLang(), data: null, updatedAt: null, error: null, timer: 0, fmt: null };

  // ---- language ---------------------------------------------------------------------------------
  function pickLang() {
    const fromUrl = new URLSearchParams(location.search).get("lang");
    if (fromUrl === "zh" || fromUrl === "en") return fromUrl;
    let stored = null;
    try { stored = localStorage.getItem(LANG_KEY); } catch (e) { stored = null; }
    if (stored === "zh" || stored === "en") return stored;
    return (navigator.language || "").toLowerCase().startsWith("zh") ? "zh" : "en";
  }

  function t(key, vars) {
    let text = I18N[state.lang][key];
    if (text === undefined) text = I18N.en[key] !== undefined ? I18N.en[key] : key;
    if (vars) text = text.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
    return text;
  }

  function channelLabel(channel) {
    const key = "ch_" + channel;
    return key in I18N[state.lang] ? t(key) : channel;
  }

  function setLang(lang, persist) {
    state.lang = lang;
    state.fmt = makeFormats(lang);
    if (persist) {
      try { localStorage.setItem(LANG_KEY, lang); } catch (e) { /* private mode: session only */ }
      const url = new URL(location.href);
      if (url.searchParams.has("lang")) {
        url.searchParams.set("lang", lang);
        history.replaceState(null, "", url);
      }
    }
    document.documentElement.lang = LOCALES[lang];
    document.documentElement.dataset.lang = lang;
    document.title = t("title");
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-aria]")) {
      node.setAttribute("aria-label", t(node.dataset.i18nAria));
    }
    for (const button of document.querySelectorAll(".lang button")) {
      button.setAttribute("aria-pressed", String(button.dataset.lang === lang));
    }
    render();
  }

  // ---- formatting -------------------------------------------------------------------------------
  function makeFormats(lang) {
    const loc = LOCALES[lang];
    return {
      int: new Intl.NumberFormat(loc, { maximumFractionDigits: 0 }),
      compact: new Intl.NumberFormat(loc, { notation: "compact", maximumFractionDigits: 1 }),
      money: new Intl.NumberFormat(loc, { minimumFractionDigits: 2, maximumFractionDigits: 2 }),
      pct: new Intl.NumberFormat(loc, { style: "percent", minimumFractionDigits: 2, maximumFractionDigits: 2 }),
      loc: loc,
    };
  }

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmtInt = (v) => (isNum(v) ? state.fmt.int.format(v) : DASH);
  const fmtMoney = (v) => (isNum(v) ? state.fmt.money.format(v) : DASH);
  const fmtPct = (v) => (isNum(v) ? state.fmt.pct.format(v) : DASH);

  function timeZone() {
    const tz = state.data && state.data.timezone;
    return tz || "UTC";
  }

  function fmtTime(iso, withDate, withSeconds) {
    if (!iso) return DASH;
    const opts = { timeZone: timeZone(), hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
    if (withSeconds) opts.second = "2-digit";
    if (withDate) { opts.month = "2-digit"; opts.day = "2-digit"; }
    try {
      return new Intl.DateTimeFormat(state.fmt.loc, opts).format(new Date(iso));
    } catch (e) {
      return iso;
    }
  }

  function fmtLocalClock(date) {
    return new Intl.DateTimeFormat(state.fmt.loc, {
      hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
    }).format(date);
  }

  // ---- DOM helpers ------------------------------------------------------------------------------
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children || []) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svgEl(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (const child of children || []) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
  }

  const $ = (sel) => document.querySelector(sel);

  function showEmpty(section, empty) {
    const box = document.querySelector(section + " .empty");
    if (box) box.hidden = !empty;
    document.querySelector(section).classList.toggle("is-empty", empty);
  }

  // ---- status line ------------------------------------------------------------------------------
  function renderStatus() {
    const d = state.data;
    const stamp = $("#stamp");
    const parts = [];
    if (d && d.as_of) {
      parts.push(t("asOf") + " " + fmtTime(d.as_of, true) + " " + timeZone());
    } else if (d) {
      parts.push(t("waitingStamp"));
    }
    if (state.updatedAt) parts.push(t("updated") + " " + fmtLocalClock(state.updatedAt));
    if (d && isNum(d.query_ms)) parts.push(t("queryMs", { ms: state.fmt.money.format(d.query_ms) }));
    stamp.textContent = parts.join(" · ");
    const error = $("#error");
    if (state.error) {
      error.textContent = t("fetchError", { msg: state.error, s: REFRESH_MS / 1000 });
      error.hidden = false;
    } else {
      error.hidden = true;
      error.textContent = "";
    }
    stamp.className = "stamp " + (state.error ? "bad" : d && d.as_of ? "ok" : "idle");
  }

  // ---- tiles ------------------------------------------------------------------------------------
  function renderTiles(d) {
    const totals = d.totals || {};
    const firing = (d.alerts || []).filter((a) => a.status === "firing").length;
    const values = {
      events: fmtInt(totals.events), users: fmtInt(totals.users), orders: fmtInt(totals.orders),
      revenue: fmtMoney(totals.revenue), firing: fmtInt(firing),
    };
    for (const tile of document.querySelectorAll(".tile")) {
      const name = tile.dataset.tile;
      tile.querySelector(".value").textContent = values[name];
      tile.classList.toggle("alarm", name === "firing" && firing > 0);
      const sub = tile.querySelector(".sub");
      sub.textContent = sub.dataset.sub === "hours"
        ? t("lastHours", { h: windowHours(d) })
        : t("amongRecent");
    }
  }

  function windowHours(d) { return d.window ? d.window.hours : params.hours; }
  function windowMinutes(d) { return d.window ? d.window.minutes : params.minutes; }

  // ---- traffic chart ----------------------------------------------------------------------------
  function channelColor(channel, index) {
    return CHANNEL_COLORS[channel] || SPARE_COLORS[index % SPARE_COLORS.length];
  }

  function niceStep(max, ticks) {
    const raw = max / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
  }

  function renderTraffic(d) {
    const box = $("#traffic-chart");
    const legend = $("#traffic-legend");
    const traffic = d.traffic || { minutes: [], series: [] };
    const minutes = traffic.minutes;
    const series = traffic.series;
    $("#traffic-sub").textContent = t("trafficSub", { m: windowMinutes(d), tz: timeZone() });
    showEmpty(".card.traffic", !d.as_of);

    const width = Math.max(320, Math.floor(box.clientWidth || 640));
    const height = 250;
    const m = { left: 46, right: 12, top: 10, bottom: 24 };
    const innerW = width - m.left - m.right;
    const innerH = height - m.top - m.bottom;
    const n = minutes.length;
    const totals = minutes.map((_, i) => series.reduce((s, ser) => s + ser.events[i], 0));
    const maxTotal = Math.max(1, ...totals);
    const step = Math.max(1, niceStep(maxTotal, 4)); // counts: whole steps
    const yMax = Math.ceil(maxTotal / step) * step;
    const x = (i) => m.left + (n <= 1 ? innerW / 2 : (i * innerW) / (n - 1));
    const y = (v) => m.top + innerH - (v / yMax) * innerH;

    const svg = svgEl("svg", {
      viewBox: `0 0 ${width} ${height}`, width: width, height: height, class: "traffic-svg",
      role: "img", "aria-label": t("traffic"), "data-points": n, "data-series": series.length,
    });
    const grid = svgEl("g", { class: "grid" });
    for (let v = 0; v <= yMax + step / 2; v += step) {
      grid.append(svgEl("line", { x1: m.left, x2: width - m.right, y1: y(v), y2: y(v) }));
      grid.append(svgEl("text", { x: m.left - 6, y: y(v) + 4, class: "y-label", text: state.fmt.compact.format(v) }));
    }
    if (n > 0) {
      const every = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720].find((k) => n / k <= Math.max(2, Math.floor(innerW / 70))) || 1440;
      for (let i = 0; i < n; i++) {
        const minuteOfDay = Math.floor(Date.parse(minutes[i]) / 60000);
        if (minuteOfDay % every !== 0 && !(n < every && i === n - 1)) continue;
        grid.append(svgEl("text", { x: x(i), y: height - 6, class: "x-label", text: fmtTime(minutes[i]) }));
      }
    }
    svg.append(grid);

    const lower = new Array(n).fill(0);
    const areas = svgEl("g", { class: "areas" });
    series.forEach((ser, k) => {
      const upper = ser.events.map((v, i) => lower[i] + v);
      const top = upper.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      const bottom = lower.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).reverse();
      const color = channelColor(ser.channel, k);
      const attrs = {
        "data-channel": ser.channel, "data-points": ser.events.length, "data-values": ser.events.join(","),
      };
      if (n > 0) {
        areas.append(svgEl("path", {
          ...attrs, class: "area", d: `M${top.join("L")}L${bottom.join("L")}Z`, fill: color,
        }));
        areas.append(svgEl("path", { class: "edge", d: `M${top.join("L")}`, stroke: color }));
      }
      for (let i = 0; i < n; i++) lower[i] = upper[i];
    });
    svg.append(areas);
    svg.append(svgEl("line", { class: "axis", x1: m.left, x2: width - m.right, y1: y(0), y2: y(0) }));

    const cursor = svgEl("line", { class: "cursor", y1: m.top, y2: m.top + innerH, x1: 0, x2: 0, visibility: "hidden" });
    svg.append(cursor);
    const hit = svgEl("rect", { class: "hit", x: m.left, y: m.top, width: innerW, height: innerH });
    svg.append(hit);
    if (n > 0) {
      hit.addEventListener("mousemove", (ev) => {
        const rect = svg.getBoundingClientRect();
        const px = ((ev.clientX - rect.left) * width) / rect.width;
        const i = n <= 1 ? 0 : Math.max(0, Math.min(n - 1, Math.round(((px - m.left) * (n - 1)) / innerW)));
        cursor.setAttribute("x1", x(i));
        cursor.setAttribute("x2", x(i));
        cursor.setAttribute("visibility", "visible");
        const rows = series.slice().reverse().map((ser) => [channelLabel(ser.channel), ser.events[i],
          channelColor(ser.channel, series.indexOf(ser))]);
        showTooltip(ev, fmtTime(minutes[i], true), rows, [t("total"), totals[i]]);
      });
      hit.addEventListener("mouseleave", () => {
        cursor.setAttribute("visibility", "hidden");
        hideTooltip();
      });
    }
    box.replaceChildren(svg);

    legend.replaceChildren(...series.map((ser, k) => el("span", { class: "item", "data-channel": ser.channel }, [
      el("i", { class: "swatch", style: `background:${channelColor(ser.channel, k)}` }),
      el("span", { class: "name", text: channelLabel(ser.channel) }),
      el("span", { class: "num", text: fmtInt(ser.total) }),
    ])));
  }

  function showTooltip(ev, title, rows, total) {
    const tip = $("#tooltip");
    tip.replaceChildren(
      el("div", { class: "tip-title", text: title }),
      ...rows.map(([name, value, color]) => el("div", { class: "tip-row" }, [
        el("i", { class: "swatch", style: `background:${color}` }),
        el("span", { class: "name", text: name }), el("span", { class: "num", text: fmtInt(value) }),
      ])),
      el("div", { class: "tip-row tip-total" }, [
        el("span", { class: "name", text: total[0] }), el("span", { class: "num", text: fmtInt(total[1]) }),
      ]),
    );
    tip.hidden = false;
    const pad = 14;
    const w = tip.offsetWidth;
    const h = tip.offsetHeight;
    let left = ev.clientX + pad;
    if (left + w > window.innerWidth - 4) left = ev.clientX - pad - w;
    let top = ev.clientY + pad;
    if (top + h > window.innerHeight - 4) top = ev.clientY - pad - h;
    tip.style.left = `${Math.max(4, left)}px`;
    tip.style.top = `${Math.max(4, top)}px`;
  }

  function hideTooltip() { $("#tooltip").hidden = true; }

  // ---- funnel -----------------------------------------------------------------------------------
  function renderFunnel(d) {
    const box = $("#funnel-chart");
    const funnel = d.funnel || { overall: null, campaigns: [] };
    const overall = funnel.overall;
    $("#funnel-sub").textContent = t("funnelSub", { h: windowHours(d) });
    showEmpty(".card.funnel", !d.as_of);

    const width = Math.max(260, Math.floor(box.clientWidth || 360));
    const rowH = 44;
    const height = STEPS.length * rowH + 24;
    const svg = svgEl("svg", {
      viewBox: `0 0 ${width} ${height}`, width: width, height: height, class: "funnel-svg",
      role: "img", "aria-label": t("funnel"), "data-points": overall ? STEPS.length : 0,
    });
    if (overall) {
      const max = Math.max(1, overall.viewed || 0);
      STEPS.forEach(([step, rateKey], i) => {
        const value = overall[step] || 0;
        const rate = rateKey ? overall[rateKey] : null;
        const y0 = i * rowH;
        const barW = Math.max(2, ((width - 2) * value) / max);
        const g = svgEl("g", {
          class: "step", "data-step": step, "data-value": value, "data-rate": isNum(rate) ? rate : null,
        });
        g.append(svgEl("text", { x: 0, y: y0 + 13, class: "step-label", text: t("step_" + step) }));
        if (rateKey) {
          g.append(svgEl("text", {
            x: width, y: y0 + 13, class: "step-rate", "text-anchor": "end",
            text: t("stepRate", { p: fmtPct(rate) }),
          }));
        }
        g.append(svgEl("rect", { x: 0, y: y0 + 18, width: barW, height: 20, rx: 3, class: "bar bar-" + i }));
        const inside = barW > 70;
        g.append(svgEl("text", {
          x: inside ? barW - 6 : barW + 6, y: y0 + 32, class: "bar-value" + (inside ? " inside" : ""),
          "text-anchor": inside ? "end" : "start", text: fmtInt(value),
        }));
        svg.append(g);
      });
      svg.append(svgEl("text", {
        x: 0, y: height - 4, class: "overall", "data-rate": isNum(overall.view_to_order) ? overall.view_to_order : null,
        text: t("overallRate", { p: fmtPct(overall.view_to_order) }),
      }));
    }
    box.replaceChildren(svg);

    const rows = (funnel.campaigns || []).filter((r) => r.viewed > 0 || r.ordered > 0);
    $("#funnel-campaigns").replaceChildren(rows.length ? table(
      [["campaign", "text"], ["channel", "text"], ["viewed", "num"], ["ordered", "num"], ["view_to_order", "num"]],
      rows.map((r) => ({
        attrs: { "data-campaign": r.campaign, "data-channel": r.channel },
        cells: [campaignCell(r.campaign), cell(channelLabel(r.channel)), cell(fmtInt(r.viewed), r.viewed),
          cell(fmtInt(r.ordered), r.ordered), cell(fmtPct(r.view_to_order), r.view_to_order)],
      })),
    ) : "");
  }

  // ---- tables -----------------------------------------------------------------------------------
  function cell(text, value, attrs) {
    return { text: text, attrs: { "data-value": isNum(value) ? value : null, ...(attrs || {}) } };
  }

  function campaignCell(campaign) {
    return campaign ? cell(campaign, null, { title: campaign })
      : cell(t("organic"), null, { class: "muted" });
  }

  function table(columns, rows, foot, emptyKey) {
    const head = el("thead", {}, [el("tr", {}, columns.map(([key, kind]) => el("th", {
      class: kind, "data-col": key, text: t("col_" + key),
    })))]);
    const makeRow = (row, tag) => el("tr", row.attrs, row.cells.map((c, i) => {
      const [key, kind] = columns[i];
      const attrs = { ...c.attrs, class: [kind, c.attrs.class].filter(Boolean).join(" "), "data-col": key };
      return el(tag, { ...attrs, text: c.text });
    }));
    const body = el("tbody", {}, rows.map((r) => makeRow(r, "td")));
    if (!rows.length && emptyKey) {
      body.append(el("tr", { class: "none" }, [el("td", { colspan: columns.length, text: t(emptyKey) })]));
    }
    const parts = [head, body];
    if (foot) parts.push(el("tfoot", {}, [makeRow(foot, "td")]));
    return el("table", {}, parts);
  }

  const CAMPAIGN_COLUMNS = [
    ["campaign", "text"], ["channel", "text"], ["impressions", "num"], ["clicks", "num"], ["ctr", "num"],
    ["orders", "num"], ["cvr", "num"], ["revenue", "num"], ["cost", "num"], ["roi", "num"], ["cpc", "num"],
    ["cpa", "num"], ["aov", "num"],
  ];

  function campaignCells(r) {
    return [
      cell(fmtInt(r.impressions), r.impressions), cell(fmtInt(r.clicks), r.clicks), cell(fmtPct(r.ctr), r.ctr),
      cell(fmtInt(r.orders), r.orders), cell(fmtPct(r.cvr), r.cvr), cell(fmtMoney(r.revenue), r.revenue),
      cell(fmtMoney(r.cost), r.cost), cell(fmtPct(r.roi), r.roi, { class: isNum(r.roi) && r.roi < 0 ? "neg" : "" }),
      cell(fmtMoney(r.cpc), r.cpc), cell(fmtMoney(r.cpa), r.cpa), cell(fmtMoney(r.aov), r.aov),
    ];
  }

  function renderCampaigns(d) {
    const c = d.campaigns || { rows: [], total: null };
    $("#campaigns-sub").textContent = t("campaignsSub", { h: windowHours(d) });
    showEmpty(".card.campaigns", !d.as_of);
    const rows = c.rows.map((r) => ({
      attrs: { "data-campaign": r.campaign, "data-channel": r.channel },
      cells: [campaignCell(r.campaign), cell(channelLabel(r.channel)), ...campaignCells(r)],
    }));
    const foot = c.total ? {
      attrs: { class: "total", "data-total": "1" },
      cells: [cell(t("total")), cell(""), ...campaignCells(c.total)],
    } : null;
    $("#campaign-table").replaceChildren(d.as_of ? table(CAMPAIGN_COLUMNS, rows, foot, "noRows") : "");
  }

  function renderAlerts(d) {
    const alerts = d.alerts || [];
    $("#alerts-sub").textContent = t("alertsSub");
    const columns = [["rule", "text"], ["series", "text"], ["severity", "text"], ["status", "text"],
      ["value", "num"], ["mu", "num"], ["sigma", "num"], ["z", "num"], ["baseline", "text"],
      ["first_seen", "text"]];
    const rows = alerts.map((a) => ({
      attrs: { "data-alert": a.alert_id, "data-status": a.status, class: a.status === "firing" ? "firing" : null,
        title: a.response || null },
      cells: [cell(a.rule), cell(a.series, null, { title: a.series }), cell(a.severity),
        cell(t("status_" + a.status) === "status_" + a.status ? a.status : t("status_" + a.status), null,
          { class: "alert-status alert-" + a.status }),
        cell(fmtMoney(a.value), a.value), cell(fmtMoney(a.mu), a.mu), cell(fmtMoney(a.sigma), a.sigma),
        cell(fmtMoney(a.z), a.z), cell(a.baseline || ""), cell(fmtTime(a.first_seen, true))],
    }));
    $("#alert-table").replaceChildren(table(columns, rows, null, "noAlerts"));
  }

  function renderModels(d) {
    const models = d.models || [];
    $("#models-sub").textContent = t("modelsSub");
    const columns = [["model", "text"], ["auc", "num"], ["log_loss", "num"], ["calibration", "num"],
      ["labels", "num"], ["label_delay", "num"], ["updated", "text"]];
    const num = (v, digits) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
    const rows = models.map((m) => ({
      attrs: { "data-model": m.model },
      cells: [cell(m.model), cell(num(m.auc, 3), m.auc), cell(num(m.log_loss, 3), m.log_loss),
        cell(num(m.calibration, 3), m.calibration), cell(String(m.labels), m.labels),
        cell(num(m.label_delay_s, 0), m.label_delay_s), cell(fmtTime(m.updated, true))],
    }));
    $("#model-table").replaceChildren(table(columns, rows, null, "noModels"));
  }

  function renderActions(d) {
    const actions = d.actions || [];
    $("#actions-sub").textContent = t("actionsSub");
    const columns = [["time", "text"], ["rule", "text"], ["user", "text"], ["channel", "text"], ["campaign", "text"]];
    const rows = actions.map((a) => ({
      attrs: { "data-action": a.action_id },
      cells: [cell(fmtTime(a.event_time, true, true)), cell(a.rule), cell(a.user_id, null, { title: a.user_id }),
        cell(channelLabel(a.channel)), campaignCell(a.campaign)],
    }));
    $("#action-table").replaceChildren(table(columns, rows, null, "noActions"));
  }

  // ---- render and refresh -----------------------------------------------------------------------
  function render() {
    renderStatus();
    const d = state.data;
    if (!d) return;
    renderTiles(d);
    renderTraffic(d);
    renderFunnel(d);
    renderCampaigns(d);
    renderAlerts(d);
    renderModels(d);
    renderActions(d);
  }

  function readParams() {
    const q = new URLSearchParams(location.search);
    const int = (name, dflt, max) => {
      const v = Number.parseInt(q.get(name) || "", 10);
      return Number.isInteger(v) && v >= 1 && v <= max ? v : dflt;
    };
    return { minutes: int("minutes", 60, 1440), hours: int("hours", 24, 744) };
  }
  const params = readParams();

  async function refresh() {
    clearTimeout(state.timer);
    const ctrl = new AbortController();
    const abort = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    try {
      const url = `api/overview?minutes=${params.minutes}&hours=${params.hours}`;
      const res = await fetch(url, { cache: "no-store", signal: ctrl.signal, headers: { Accept: "application/json" } });
      if (!res.ok) {
        let detail = `HTTP ${res.status}`;
        try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
        throw new Error(detail);
      }
      const data = await res.json();
      state.data = data;
      state.updatedAt = new Date();
      state.error = null;
      render();
      const root = document.documentElement;
      root.dataset.asOf = data.as_of || "";
      root.dataset.refreshes = String(Number(root.dataset.refreshes || 0) + 1);
      if (root.dataset.ready !== "1") root.dataset.readyMs = String(Math.round(performance.now()));
      root.dataset.ready = "1";
    } catch (err) {
      state.error = err && err.name === "AbortError" ? "timeout" : String((err && err.message) || err);
      renderStatus();
    } finally {
      clearTimeout(abort);
      state.timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  function start() {
    for (const button of document.querySelectorAll(".lang button")) {
      button.addEventListener("click", () => setLang(button.dataset.lang, true));
    }
    let resizeTimer = 0;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(render, 150);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.updatedAt && Date.now() - state.updatedAt.getTime() > REFRESH_MS) refresh();
    });
    setLang(state.lang, false);
    refresh();
  }

  start();
})();
