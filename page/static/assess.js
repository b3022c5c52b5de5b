// Assess mode: label the points of a blind accuracy assessment sample one at a time, and follow the design-based
// estimates of the map's accuracy and class areas. Blind: the server never sends a point's map class, and in this
// mode the page shows no prediction overlay, no clicks and no suggestions.
import * as api from "./api.js";

const ASSESS_SCALE = 4; // screen pixels per image pixel around a sample point

export class Assess {
  constructor(app) {
    this.app = app;
    this.point = null; // {id, index, image, row, col, reference, previous, following}: never the map class
    this.busy = false; // a label is being saved: a key pressed meanwhile must not label the same point again
    this.el = (id) => document.getElementById(id);
    this.classButtons();
    this.el("assess-skip").onclick = () => this.skip();
    this.el("assess-back").onclick = () => this.back();
    this.el("assess-clear").onclick = () => this.label(null);
    this.el("assess-centre").onclick = () => this.centre();
    this.el("assess-write").onclick = () => this.write();
  }

  classButtons() {
    const div = this.el("assess-classes");
    this.app.config.classes.names.forEach((name, i) => {
      const b = document.createElement("button");
      b.textContent = i < 9 ? `${i + 1} ${name}` : name;
      b.dataset.cls = i;
      b.onclick = () => this.label(i);
      div.append(b);
    });
  }

  // Entering the mode: the first unlabelled point (or the first point when all are labelled), and the estimates.
  async enter() {
    try {
      const s = await api.get("/api/assess");
      this.progress(s);
      await this.show(this.point ? this.point.id : s.next ? s.next.id : this.app.config.assess.first);
    } catch (e) {
      this.app.message(e.message);
    }
    this.estimates();
  }

  async show(id) {
    this.point = await api.get(`/api/assess/point?id=${id}`);
    const p = this.point;
    this.el("assess-point").textContent = `point ${p.index} (id ${p.id}): ${p.image}, row ${p.row}, col ${p.col}`;
    for (const b of this.el("assess-classes").children) {
      b.classList.toggle("current", Number(b.dataset.cls) === p.reference);
    }
    this.app.select(p.image);
    this.centre();
  }

  // The view centred on the point, zoomed in to ASSESS_SCALE.
  centre() {
    if (this.point) this.app.viewer.centreOn(this.point.col + 0.5, this.point.row + 0.5, ASSESS_SCALE);
  }

  progress(s) {
    this.el("assess-progress").textContent = `${s.labelled} of ${s.points} labelled`;
  }

  // Save the label (a class index, or null to clear it) at once; go on to the next unlabelled point after this one.
  async label(cls) {
    if (!this.point || this.busy) return;
    this.busy = true;
    try {
      const r = await api.post("/api/assess", { id: this.point.id, reference: cls });
      this.progress(r);
      this.app.message(r.next ? "" : `all ${r.points} points are labelled`);
      await this.show(r.next && cls !== null ? r.next.id : this.point.id);
    } catch (e) {
      this.app.message(e.message);
    } finally {
      this.busy = false;
    }
    this.estimates();
  }

  skip() { this.go(this.point && this.point.following); }
  back() { this.go(this.point && this.point.previous); }

  go(id) {
    if (id) this.show(id).catch((e) => this.app.message(e.message));
  }

  // The estimates table, or the server's reason why there is none yet (too few labelled points in a stratum).
  async estimates() {
    const table = this.el("estimates"), oa = this.el("estimates-oa"), note = this.el("estimates-note");
    try {
      const e = await api.get("/api/assess/estimates");
      note.textContent = `${e.basis}. Accuracies and shares in %; each ± is the half-width of the 95 % interval. ` +
        "The share of the map is its pixel count, not an area estimate.";
      oa.textContent = `Overall accuracy: ${formatFigure(e.overall_accuracy)} %`;
      table.replaceChildren(...estimatesRows(e));
      table.hidden = oa.hidden = false;
    } catch (e) {
      table.hidden = oa.hidden = true;
      note.textContent = e.status === 409 ? e.message : "";
      if (e.status !== 409) this.app.message(e.message);
    }
  }

  async write() {
    try {
      const r = await api.post("/api/assess/write", { overwrite: this.el("assess-overwrite").checked });
      this.app.message(`wrote ${r.csv} and ${r.markdown} (${r.labelled} of ${r.points} points labelled)`);
    } catch (e) {
      this.app.message(e.message);
    }
  }

  // Keys in this mode: 1-9 label the point, arrows (or s / b) skip and go back, c centres. True when handled.
  key(e) {
    if (/^[1-9]$/.test(e.key) && Number(e.key) <= this.app.config.classes.names.length) this.label(Number(e.key) - 1);
    else if (e.key === "ArrowRight" || e.key === "s") this.skip();
    else if (e.key === "ArrowLeft" || e.key === "b") this.back();
    else if (e.key === "c") this.centre();
    else return false;
    return true;
  }

  // A crosshair around the point's pixel, its four arms leaving the pixel itself in view.
  draw(ctx, viewer) {
    const p = this.point;
    if (!p || !viewer.image || viewer.image.name !== p.image) return;
    const [x, y] = viewer.imageToScreen(p.col + 0.5, p.row + 0.5);
    const half = Math.max(3, viewer.scale / 2) + 2;
    for (const [colour, width] of [["#000", 4], ["#ffeb3b", 2]]) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = width;
      ctx.strokeRect(x - half, y - half, 2 * half, 2 * half);
      ctx.beginPath();
      for (const [dx, dy] of [[1, 0], [-1, 0], [0, 1], [0, -1]]) {
        ctx.moveTo(x + dx * (half + 4), y + dy * (half + 4));
        ctx.lineTo(x + dx * (half + 24), y + dy * (half + 24));
      }
      ctx.stroke();
    }
  }
}

// "91.2 ± 4.1": an estimate and the half-width of its 95 % interval, in percent (or, not `percent`, to three
// significant digits in its own unit); "n/a" where undefined.
function formatFigure(f, percent = true) {
  if (!f || f.estimate === null) return "n/a";
  const show = (v) => (percent ? (100 * v).toFixed(1) : v.toPrecision(3));
  return f.se === null ? `${show(f.estimate)} ± n/a` : `${show(f.estimate)} ± ${show((f.high - f.low) / 2)}`;
}

function estimatesRows(e) {
  const row = (tag, cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement(tag);
      td.textContent = c;
      tr.append(td);
    }
    return tr;
  };
  const ha = e.pixel_area_m2 !== null;
  const rows = [row("th", ["class", "user's accuracy", "producer's accuracy", "area share, estimated",
    "share of the map (pixel count)", ha ? "area (ha), estimated" : "area (pixels), estimated"])];
  for (const c of e.classes) {
    rows.push(row("td", [c.name, formatFigure(c.users_accuracy), formatFigure(c.producers_accuracy),
      formatFigure(c.area_proportion), (100 * c.map_share).toFixed(1),
      formatFigure(ha ? c.area_ha : c.area_pixels, false)]));
  }
  return rows;
}
