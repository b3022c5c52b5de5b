// The model: start a short training, follow its progress (the server reads train.py's progress file: step of
// steps), show its prediction, its accuracy on held-out clicks and the places it is least sure of (suggestions,
// answered by ordinary clicks).
import * as api from "./api.js";

export class Training {
  constructor(app) {
    this.app = app;
    this.model = 0;
    this.suggestions = []; // [{image, x, y, margin, predicted}]
    this.timer = null;
    this.el = (id) => document.getElementById(id);
  }

  async start() {
    try {
      const v = this.el("epochs").value.trim(); // empty: the server's default; anything else it checks (400)
      const s = await api.post("/api/train", v === "" ? {} : { epochs: Number(v) });
      this.show(s);
      this.poll();
    } catch (e) {
      this.app.message(e.message);
    }
  }

  poll() {
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      const s = await api.get("/api/train").catch(() => null);
      if (s) this.show(s);
      if (!s || s.state === "running" || s.state === "predicting") this.poll();
    }, 700);
  }

  show(s) {
    const bar = this.el("progress");
    bar.max = s.steps || 1;
    bar.value = s.state === "done" ? bar.max : Math.min(s.step || 0, bar.max);
    const at = !s.steps ? "starting"
      : s.unit === "step" ? `step ${s.step} of ${s.steps}`
      : `epoch ${s.epoch} of ${s.epochs} (step ${s.step} of ${s.steps})`;
    const text = {
      idle: "no model yet",
      running: `training: ${at}`,
      predicting: "predicting the images" + (s.steps ? ` (trained ${s.step} of ${s.steps} steps)` : ""),
      done: `model ${s.model} shown`,
      failed: s.message + (s.log && s.log.length ? `: ${s.log[s.log.length - 1]}` : ""),
    }[s.state];
    this.el("train-status").textContent = text;
    this.el("train").disabled = s.state === "running" || s.state === "predicting";
    if (s.state === "done" && s.model !== this.model) {
      this.model = s.model;
      this.app.viewer.model = s.model;
      this.app.viewer.predicted = new Set(s.predicted);
      this.el("accuracy").textContent = formatMetrics(s.metrics);
      this.app.viewer.redraw();
    }
  }

  async suggest() {
    try {
      const n = this.el("suggest-n").value.trim(); // empty: the server's default; anything else it checks
      this.suggestions = (await api.get(n === "" ? "/api/suggest" : `/api/suggest?n=${Number(n)}`)).suggestions;
    } catch (e) {
      this.app.message(e.message);
      return;
    }
    this.list();
    if (this.suggestions.length) this.goTo(this.suggestions[0]);
  }

  list() {
    const ol = this.el("suggestions");
    ol.replaceChildren(...this.suggestions.map((s) => {
      const li = document.createElement("li");
      li.textContent = `${s.image} (${s.x}, ${s.y}) margin ${s.margin.toFixed(2)}`;
      li.onclick = () => this.goTo(s);
      return li;
    }));
    this.app.viewer.redraw();
  }

  goTo(s) {
    this.app.select(s.image, () => this.app.viewer.centreOn(s.x + 0.5, s.y + 0.5));
  }

  // The suggestion under screen point (sx, sy), or null: a click there answers it (its exact pixel).
  hit(viewer, sx, sy, radius = 10) {
    return this.suggestions.find((s) => {
      if (s.image !== viewer.image.name) return false;
      const [px, py] = viewer.imageToScreen(s.x + 0.5, s.y + 0.5);
      return Math.hypot(px - sx, py - sy) <= radius;
    }) || null;
  }

  answered(s) {
    this.suggestions = this.suggestions.filter((t) => t !== s);
    this.list();
  }

  draw(ctx, viewer) {
    ctx.strokeStyle = "#ff8c00";
    ctx.lineWidth = 3;
    for (const s of this.suggestions) {
      if (s.image !== viewer.image.name) continue;
      const [sx, sy] = viewer.imageToScreen(s.x + 0.5, s.y + 0.5);
      ctx.beginPath();
      ctx.arc(sx, sy, 10, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }
}

// history.json's val_* numbers of the shown model, labelled: they are measured on held-out clicks, and say what
// they cover (val_scope: the kind of pixels that were clicked, not the map; the map's accuracy is the Assess tab's).
function formatMetrics(m) {
  if (!m) return "";
  const parts = [];
  for (const [k, v] of Object.entries(m)) {
    if (typeof v !== "number" || !k.startsWith("val_") || k.endsWith("_ci")) continue;
    const ci = m[`${k}_ci`];
    const name = k.slice(4).replace(/_/g, " ");
    parts.push(Array.isArray(ci) && ci.every((c) => typeof c === "number")
      ? `${name} ${v.toFixed(3)} [${ci[0].toFixed(3)}, ${ci[1].toFixed(3)}]`
      : `${name} ${v.toFixed(3)}`);
  }
  const what = typeof m.val_scope === "string" ? `held-out clicks (${m.val_scope})` : "held-out clicks";
  return parts.length ? `${what}: ${parts.join("; ")}` : `${what}: none measured`;
}
