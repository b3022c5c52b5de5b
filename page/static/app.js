// The page: image list, class legend and keys, mouse actions on the map, and keeping up with other tabs; with an
// assessment sample (--assess), the Assess mode (assess.js), in which nothing of the annotation is shown.
// The entry module (index.html loads only this one). Every bound the page keeps to is the server's, read from
// /api/config's `bounds`; the page's one global is `window.app` (below).
import * as api from "./api.js";
import { Assess } from "./assess.js";
import { Clicks } from "./clicks.js";
import { Training } from "./train.js";
import { Viewer } from "./viewer.js";

class App {
  constructor(config) {
    this.config = config;
    this.palette = config.classes.palette;
    this.cls = 0;
    this.mode = "annotate"; // or "assess"
    this.viewer = new Viewer(document.getElementById("canvas"), config.bounds);
    this.clicks = new Clicks(config.bounds, () => this.clicksChanged());
    this.training = new Training(this);
    this.assess = config.assess ? new Assess(this) : null;
    this.viewer.onDraw.push((ctx, v) => { if (this.mode === "annotate") this.clicks.draw(ctx, v, this.palette); });
    this.viewer.onDraw.push((ctx, v) => { if (this.mode === "annotate") this.training.draw(ctx, v); });
    this.viewer.onDraw.push((ctx, v) => { if (this.mode === "assess") this.assess.draw(ctx, v); });
    document.getElementById("clicks-file").textContent = config.clicks_file;
    document.getElementById("epochs").value = config.epochs;
    document.getElementById("epochs").max = config.bounds.max_epochs; // the server's bounds (400 past them)
    document.getElementById("suggest-n").max = config.bounds.max_suggestions;
    const rule = document.getElementById("suggest-rule"); // the server's rules, its default chosen
    rule.replaceChildren(...config.suggest.rules.map((r) => new Option(r, r, r === config.suggest.default,
                                                                       r === config.suggest.default)));
    this.images();
    this.legend();
    this.mouse();
    this.keys();
    this.buttons();
    this.modes();
  }

  // The Assess tab, only with an assessment sample.
  modes() {
    if (!this.assess) return;
    document.getElementById("modes").hidden = false;
    document.getElementById("assess-file").textContent = this.config.assess.sample;
    document.getElementById("mode-annotate").onclick = () => this.setMode("annotate");
    document.getElementById("mode-assess").onclick = () => this.setMode("assess");
  }

  // Assess mode is blind: no prediction overlay (nor its controls), no clicks, no suggestions; a click adds nothing.
  setMode(mode) {
    if (mode === this.mode) return;
    this.mode = mode;
    document.body.classList.toggle("assess", mode === "assess");
    for (const m of ["annotate", "assess"]) {
      document.getElementById(`mode-${m}`).classList.toggle("current", m === mode);
    }
    this.viewer.showOverlay = mode === "annotate";
    this.message("");
    if (mode === "assess") this.assess.enter();
    else this.viewer.fit();
  }

  message(text) {
    document.getElementById("message").textContent = text || "";
  }

  count() {
    document.getElementById("count").textContent = this.clicks.total();
  }

  // Every change of the click file (a click here, undo, another tab's): the live layer is repainted from it.
  clicksChanged() {
    this.count();
    this.viewer.clicksVersion = this.clicks.version;
    if (this.viewer.layer === "live") this.training.live();
    this.viewer.redraw();
  }

  images() {
    const ul = document.getElementById("images");
    for (const im of this.config.images) {
      const li = document.createElement("li");
      li.textContent = `${im.file} (${im.width} x ${im.height})`;
      li.dataset.name = im.name;
      li.onclick = () => this.select(im.name);
      ul.append(li);
    }
    for (const e of this.config.errors) {
      const li = document.createElement("li");
      li.className = "error";
      li.textContent = `${e.file}: ${e.error}`;
      ul.append(li);
    }
  }

  select(name, then) {
    const im = this.config.images.find((i) => i.name === name);
    if (!im) return;
    for (const li of document.querySelectorAll("#images li")) li.classList.toggle("current", li.dataset.name === name);
    if (!this.viewer.image || this.viewer.image.name !== name) this.viewer.show(im);
    this.training.showChanged();
    if (then) then();
  }

  legend() {
    const ul = document.getElementById("legend");
    this.config.classes.names.forEach((n, i) => {
      const li = document.createElement("li");
      li.innerHTML = `<span class="swatch"></span>${i < 9 ? i + 1 : "&nbsp;"} ${n}`;
      li.querySelector(".swatch").style.background = `rgb(${this.palette[i].join(",")})`;
      li.dataset.cls = i;
      li.onclick = () => this.setClass(i);
      ul.append(li);
    });
    this.setClass(0);
  }

  setClass(i) {
    if (i < 0 || i >= this.palette.length) return;
    this.cls = i;
    for (const li of document.querySelectorAll("#legend li")) li.classList.toggle("current", Number(li.dataset.cls) === i);
  }

  // A click adds a point (or answers a suggestion), a click on a point removes it; drag pans, shift+drag scribbles.
  async clickAt(sx, sy) {
    if (this.mode !== "annotate") return;
    const v = this.viewer;
    const name = v.image.name;
    try {
      const s = this.training.hit(v, sx, sy);
      if (s) {
        await this.clicks.add(name, [[s.x, s.y]], this.cls);
        this.training.answered(s);
        return;
      }
      const p = this.clicks.hit(v, sx, sy);
      if (p) return await this.clicks.remove(name, [[p.x, p.y]]);
      const [x, y] = v.screenToImage(sx, sy);
      if (x < 0 || y < 0 || x >= v.image.width || y >= v.image.height) return;
      await this.clicks.add(name, [[x, y]], this.cls);
      this.message("");
    } catch (e) {
      this.message(e.message);
    }
  }

  mouse() {
    const c = this.viewer.canvas;
    let down = null, line = null;
    const pos = (e) => { const r = c.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
    c.addEventListener("mousedown", (e) => {
      if (!this.viewer.image || e.button !== 0) return;
      down = pos(e);
      down.moved = false;
      line = e.shiftKey && this.mode === "annotate" ? [this.viewer.screenToImage(...down)] : null;
    });
    c.addEventListener("mousemove", (e) => {
      if (!down) return;
      const p = pos(e);
      if (Math.hypot(p[0] - down[0], p[1] - down[1]) > 4) down.moved = true;
      if (line) {
        line.push(this.viewer.screenToImage(...p));
        const ctx = this.viewer.ctx;
        const [a, b] = [this.viewer.imageToScreen(...line[line.length - 2]), p];
        ctx.strokeStyle = `rgb(${this.palette[this.cls].join(",")})`;
        ctx.lineWidth = 3;
        ctx.beginPath(); ctx.moveTo(...a); ctx.lineTo(...b); ctx.stroke();
      } else if (down.moved) {
        this.viewer.pan(e.movementX, e.movementY);
      }
    });
    window.addEventListener("mouseup", (e) => {
      if (!down) return;
      const p = pos(e), wasLine = line, moved = down.moved;
      down = line = null;
      if (wasLine && moved) this.scribble(wasLine);
      else if (!moved) this.clickAt(...p);
    });
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const [sx, sy] = pos(e);
      this.viewer.zoomAt(sx, sy, e.deltaY < 0 ? 1.25 : 0.8);
    }, { passive: false });
  }

  // Send a scribble: at most the server's vertices (the rest dropped, and said), its nodata pixels left out (said).
  async scribble(line) {
    const most = this.config.bounds.max_line_vertices;
    try {
      const r = await this.clicks.add(this.viewer.image.name, line.slice(0, most), this.cls, "line");
      const said = [];
      if (line.length > most) said.push(`the scribble was cut to its first ${most} of ${line.length} points`);
      if (r.nodata) said.push(`${r.nodata} of its pixels lie on nodata and were left out`);
      this.message(said.join("; "));
    } catch (e) {
      this.message(e.message);
    }
  }

  keys() {
    window.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT") return;
      if (this.mode === "assess" && (this.assess.key(e) || /^[0-9]$/.test(e.key) || e.ctrlKey)) return;
      if (e.ctrlKey && (e.key === "z" || e.key === "Z")) { e.preventDefault(); e.shiftKey ? this.redo() : this.undo(); }
      else if (e.ctrlKey && e.key === "y") { e.preventDefault(); this.redo(); }
      else if (/^[1-9]$/.test(e.key)) this.setClass(Number(e.key) - 1);
      else if (e.key === "f") this.viewer.fit();
      else if (e.key === "+") this.viewer.zoomAt(this.viewer.canvas.width / 2, this.viewer.canvas.height / 2, 1.25);
      else if (e.key === "-") this.viewer.zoomAt(this.viewer.canvas.width / 2, this.viewer.canvas.height / 2, 0.8);
    });
  }

  // What the server's read of the click file left out (clicks on nodata written by another program).
  notes(notes) {
    if (notes.length) this.message(notes.join("; "));
  }

  undo() { this.clicks.undo().catch((e) => this.message(e.message)); }
  redo() { this.clicks.redo().catch((e) => this.message(e.message)); }

  buttons() {
    const el = (id) => document.getElementById(id);
    el("undo").onclick = () => this.undo();
    el("redo").onclick = () => this.redo();
    el("train").onclick = () => this.training.start(false);
    el("retrain").onclick = () => this.training.start(true);
    el("suggest").onclick = () => this.training.suggest();
    el("opacity").oninput = (e) => { this.viewer.opacity = Number(e.target.value); this.viewer.redraw(); };
    el("layer").onchange = (e) => {
      this.viewer.layer = e.target.value;
      if (e.target.value === "live") this.training.live();
      else el("live").textContent = "";
      this.viewer.redraw();
    };
  }

  // Other tabs and people write the same file: reload its clicks when it changed under us.
  watch() {
    setInterval(async () => {
      const v = await api.get("/api/version").catch(() => null);
      if (!v) return;
      if (v.version !== this.clicks.version) this.clicks.load().then((notes) => this.notes(notes), () => {});
      if (v.model !== this.training.model) this.training.poll();
    }, 2000);
  }
}

// A module runs once the document is parsed.
const config = await api.get("/api/config");
const app = new App(config);
// The page's one global: tests/test_annotate_browser.py reads the page's state through it (app.viewer, app.cls,
// app.training.suggestions, app.assess.point, ...). Nothing else is put on window.
window.app = app;
app.notes(await app.clicks.load());
if (config.images.length) app.select(config.images[0].name);
app.training.poll();
app.watch();
document.body.dataset.ready = "1";
