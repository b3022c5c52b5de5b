// The clicks: what the click file holds per image, changed by operations (add / remove pixels) that the server
// applies to the file at once; undo and redo send the inverse operation.
import * as api from "./api.js";

export class Clicks {
  // bounds: /api/config's; an operation names at most max_pixels_per_op pixels in at most max_body bytes.
  constructor(bounds, onChange) {
    this.bounds = bounds;
    this.byImage = new Map(); // image name -> Map "x,y" -> {x, y, cls, kind}
    this.undoStack = [];
    this.redoStack = [];
    this.version = "";
    this.onChange = onChange;
  }

  // Read the file's clicks; returns what the server's read left out and why (clicks on nodata edited in elsewhere).
  async load(name) {
    const r = await api.get(name ? `/api/clicks?image=${encodeURIComponent(name)}` : "/api/clicks");
    for (const [img, pts] of Object.entries(r.clicks)) {
      this.byImage.set(img, new Map(pts.map(([x, y, cls, kind]) => [`${x},${y}`, { x, y, cls, kind }])));
    }
    this.version = r.version;
    this.onChange();
    return r.notes || [];
  }

  of(name) { return this.byImage.get(name) || new Map(); }
  total() { let n = 0; for (const m of this.byImage.values()) n += m.size; return n; }

  // The click nearest to screen point (sx, sy) within `radius` screen pixels, or null.
  hit(viewer, sx, sy, radius = 7) {
    let best = null, bestD = radius;
    for (const p of this.of(viewer.image.name).values()) {
      const [px, py] = viewer.imageToScreen(p.x + 0.5, p.y + 0.5);
      const d = Math.hypot(px - sx, py - sy);
      if (d <= bestD) { best = p; bestD = d; }
    }
    return best;
  }

  // Send one operation; apply the server's account of what changed; returns that account.
  async send(op) {
    const r = await api.post("/api/clicks", op);
    const m = this.byImage.get(op.image) || new Map();
    this.byImage.set(op.image, m);
    for (const [x, y, , cls] of r.changed) {
      if (cls === null) m.delete(`${x},${y}`);
      else m.set(`${x},${y}`, { x, y, cls, kind: op.kind || "point" });
    }
    this.version = r.version;
    this.onChange();
    return r;
  }

  // Returns the server's account: r.nodata pixels of a line were left out (on nodata).
  async add(image, points, cls, kind = "point") {
    const r = await this.send({ op: "add", image, points, class: cls, kind });
    this.record({ image, kind, changed: r.changed });
    return r;
  }

  async remove(image, points) {
    const r = await this.send({ op: "remove", image, points });
    this.record({ image, kind: "point", changed: r.changed });
  }

  record(step) {
    if (!step.changed.length) return;
    this.undoStack.push(step);
    this.redoStack = [];
  }

  // The operation `op` (of points) as operations the server takes: at most max_pixels_per_op points and max_body
  // bytes each. An undo of a long scribble names up to max_pixels_per_op pixels, which can pass max_body.
  batches(op) {
    const out = [];
    for (let i = 0; i < op.points.length;) {
      let n = Math.min(this.bounds.max_pixels_per_op, op.points.length - i);
      while (n > 1 && api.bodyBytes({ ...op, points: op.points.slice(i, i + n) }) > this.bounds.max_body) {
        n = Math.ceil(n / 2);
      }
      out.push({ ...op, points: op.points.slice(i, i + n) });
      i += n;
    }
    return out;
  }

  // Make pixels hold `target(change)` (a class or null): one remove and one add per class (in parts, batches()).
  async restore(step, target) {
    const groups = new Map();
    for (const c of step.changed) {
      const cls = target(c);
      if (!groups.has(cls)) groups.set(cls, []);
      groups.get(cls).push([c[0] + 0.5, c[1] + 0.5]);
    }
    for (const [cls, points] of groups) {
      const op = cls === null ? { op: "remove", image: step.image, points }
        : { op: "add", image: step.image, points, class: cls, kind: "point" };
      for (const part of this.batches(op)) await this.send(part);
    }
  }

  async undo() {
    const step = this.undoStack.pop();
    if (!step) return;
    await this.restore(step, (c) => c[2]);
    this.redoStack.push(step);
  }

  async redo() {
    const step = this.redoStack.pop();
    if (!step) return;
    await this.restore(step, (c) => c[3]);
    this.undoStack.push(step);
  }

  draw(ctx, viewer, palette) {
    const r = Math.max(3, Math.min(7, viewer.scale * 3));
    for (const p of this.of(viewer.image.name).values()) {
      const [sx, sy] = viewer.imageToScreen(p.x + 0.5, p.y + 0.5);
      ctx.fillStyle = `rgb(${palette[p.cls].join(",")})`;
      ctx.strokeStyle = "#000";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      if (p.kind === "line") ctx.rect(sx - 2, sy - 2, 4, 4);
      else ctx.arc(sx, sy, r, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
    }
  }
}
