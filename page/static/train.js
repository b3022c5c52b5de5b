// The model: Train (adapt the model shown to the clicks as they are now, or train anew when there is none yet) and
// Retrain from scratch; follow the run's progress (the server reads train.py's progress file: step of steps), show
// its prediction, its accuracy on held-out clicks, what changed since the previous model and places to click next
// (suggestions: random by default, or the least sure; answered by ordinary clicks); with the live layer, what the
// head the server re-fits at each click was fitted on.
import * as api from "./api.js";

export class Training {
  constructor(app) {
    this.app = app;
    this.model = 0;
    this.changed = null; // the status's `changed`: {since, pixels: {image: n}, share: {image: f}, note}
    this.suggestions = []; // [{image, x, y, margin, predicted}]
    this.liveState = null; // /api/live: {model, version, clicks, conditioned, head, seconds}
    this.timer = null;
    this.el = (id) => document.getElementById(id);
    const steps = app.config.adapt_steps;
    this.el("train-how").textContent = steps
      ? `Train adapts the model shown (${steps} steps); the first Train and Retrain from scratch train anew.`
      : "The train command names {epochs}, not {budget}: every Train trains anew.";
  }

  // restart: Retrain from scratch (else the server adapts the model shown, when there is one).
  async start(restart) {
    try {
      const v = this.el("epochs").value.trim(); // empty: the server's default; anything else it checks (400)
      const s = await api.post("/api/train", v === "" ? { restart } : { epochs: Number(v), restart });
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
      running: (s.how === "adapt" ? `adapting model ${s.from_model}` : "training anew") + `: ${at}`,
      predicting: "predicting the images" + (s.steps ? ` (trained ${s.step} of ${s.steps} steps)` : ""),
      done: `model ${s.model} shown: ${s.message}`,
      failed: s.message + (s.log && s.log.length ? `: ${s.log[s.log.length - 1]}` : ""),
    }[s.state];
    this.el("train-status").textContent = text;
    const busy = s.state === "running" || s.state === "predicting";
    this.el("train").disabled = this.el("retrain").disabled = busy;
    if (s.state === "done" && s.model !== this.model) {
      this.model = s.model;
      this.changed = s.changed;
      const v = this.app.viewer;
      v.model = s.model;
      v.predicted = new Set(s.predicted);
      v.compared = new Set(Object.keys((s.changed && s.changed.pixels) || {}));
      this.el("accuracy").textContent = formatMetrics(s.metrics);
      this.showChanged();
      if (v.layer === "live") this.live();
      v.redraw();
    }
  }

  // The live layer's head, fitted for the clicks as they are now (the server fits it if they changed).
  async live() {
    try {
      const s = await api.get("/api/live");
      this.liveState = s;
      const clicks = `${s.clicks} click${s.clicks === 1 ? "" : "s"}`;
      if (s.conditioned) { // the network takes the clicks as input: the image predicted again, nothing fitted
        const ms = Math.round((s.seconds.input + s.seconds.predict) * 1000); // not a server bound
        this.el("live").textContent = `live: model ${s.model} predicted again with ${clicks} as its input in ` +
          `${ms} ms, no training (Train adapts the network itself)`;
        return;
      }
      const seconds = s.seconds.fit + s.seconds.gather + s.seconds.features;
      const ms = Math.round(seconds * 1000); // not a server bound
      this.el("live").textContent = `live: model ${s.model}'s head re-fitted on ${clicks} in ${ms} ms, no training ` +
        "(Train adapts the network itself)";
    } catch (e) {
      this.el("live").textContent = e.status === 409 ? "live: no model yet (train first)" : e.message;
    }
  }

  // How many pixels of the image shown (and of all) changed class since the previous model.
  showChanged() {
    const c = this.changed, image = this.app.viewer.image;
    this.el("changed").textContent = !c ? ""
      : c.since === null ? `changed: nothing to compare (${c.note})`
      : formatChanged(c, image && image.name);
  }

  async suggest() {
    try {
      const n = this.el("suggest-n").value.trim(); // empty: the server's default; anything else it checks
      const rule = encodeURIComponent(this.el("suggest-rule").value);
      const query = n === "" ? `rule=${rule}` : `n=${Number(n)}&rule=${rule}`;
      this.suggestions = (await api.get(`/api/suggest?${query}`)).suggestions;
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

// "changed since model k: n pixels of this image (x %); m of all N images".
function formatChanged(c, name) {
  const all = Object.values(c.pixels).reduce((a, b) => a + b, 0);
  const here = name in c.pixels
    ? `${c.pixels[name]} pixels of this image (${(100 * c.share[name]).toFixed(1)} %)`
    : "this image not compared";
  return `changed since model ${c.since}: ${here}; ${all} of all ${Object.keys(c.pixels).length} images`;
}
