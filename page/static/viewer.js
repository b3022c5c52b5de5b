// The map: one image on a canvas, panned and zoomed, drawn from tiles the server cuts (never the whole image),
// with the model's prediction as a transparent overlay and whatever the other modules draw on top (onDraw). The
// "live" layer is the model's head re-fitted on the clicks by the server at each click: its tiles are asked for
// again whenever the click file's version changes, and the last version's stay drawn until the new ones come.
import * as api from "./api.js";

const TILE = 256; // the tile side asked for, in screen-sized pixels, unless the server's max_tile is smaller

export class Viewer {
  // bounds: /api/config's; tiles are at most max_tile pixels a side and of zoom levels up to max_zoom.
  constructor(canvas, bounds) {
    this.canvas = canvas;
    this.tileSide = Math.min(TILE, bounds.max_tile);
    this.maxZoom = bounds.max_zoom;
    this.ctx = canvas.getContext("2d");
    this.image = null; // {name, width, height}
    this.scale = 1; // screen pixels per image pixel
    this.ox = 0; // screen position of image pixel (0, 0)
    this.oy = 0;
    this.tiles = new Map(); // url -> HTMLImageElement (loaded or loading)
    this.model = 0; // the prediction's number: 0 = none
    this.layer = "classes"; // or "unsure", "changed" (since the previous model), "live" (re-fitted at each click)
    this.clicksVersion = ""; // the click file's version: the live layer's tiles are of it
    this.liveDrawn = null; // the click file version whose live tiles were drawn last
    this.opacity = 0.5;
    this.predicted = new Set(); // images the model has a prediction of
    this.compared = new Set(); // images whose prediction is compared with the previous model's (the changed layer)
    this.showOverlay = true; // false in Assess mode: the labeller never sees a prediction
    this.overlayTilesShown = 0;
    this.onDraw = []; // functions (ctx, viewer) drawn after the tiles
    this.pending = false;
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
  }

  resize() {
    this.canvas.width = this.canvas.clientWidth;
    this.canvas.height = this.canvas.clientHeight;
    this.redraw();
  }

  show(image) {
    this.image = image;
    this.fit();
  }

  fit() {
    if (!this.image) return;
    const { width: W, height: H } = this.image;
    this.scale = 0.95 * Math.min(this.canvas.width / W, this.canvas.height / H);
    this.ox = (this.canvas.width - W * this.scale) / 2;
    this.oy = (this.canvas.height - H * this.scale) / 2;
    this.redraw();
  }

  imageToScreen(x, y) { return [this.ox + x * this.scale, this.oy + y * this.scale]; }
  screenToImage(sx, sy) { return [(sx - this.ox) / this.scale, (sy - this.oy) / this.scale]; }

  centreOn(x, y, scale) {
    if (scale) this.scale = scale;
    this.ox = this.canvas.width / 2 - x * this.scale;
    this.oy = this.canvas.height / 2 - y * this.scale;
    this.redraw();
  }

  zoomAt(sx, sy, factor) {
    const [x, y] = this.screenToImage(sx, sy);
    this.scale = Math.min(32, Math.max(1e-4, this.scale * factor));
    this.ox = sx - x * this.scale;
    this.oy = sy - y * this.scale;
    this.redraw();
  }

  pan(dx, dy) {
    this.ox += dx;
    this.oy += dy;
    this.redraw();
  }

  // Zoom level: a tile at level z shows 2**z image pixels per tile pixel; the coarsest shows the whole image in one
  // tile, or is the server's max_zoom.
  maxLevel() {
    const whole = Math.ceil(Math.log2(Math.max(this.image.width, this.image.height) / this.tileSide));
    return Math.min(this.maxZoom, Math.max(0, whole));
  }
  level() { return Math.min(this.maxLevel(), Math.max(0, Math.floor(Math.log2(1 / this.scale)))); }

  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  // The tiles of level z that cover the screen: [{tx, ty, x0, y0, w, h}] in image pixels.
  visibleTiles(z) {
    const side = this.tileSide * 2 ** z;
    const [x0, y0] = this.screenToImage(0, 0);
    const [x1, y1] = this.screenToImage(this.canvas.width, this.canvas.height);
    const { width: W, height: H } = this.image;
    const out = [];
    for (let ty = Math.max(0, Math.floor(y0 / side)); ty * side < Math.min(H, y1); ty++) {
      for (let tx = Math.max(0, Math.floor(x0 / side)); tx * side < Math.min(W, x1); tx++) {
        out.push({ tx, ty, x0: tx * side, y0: ty * side, w: Math.min(side, W - tx * side), h: Math.min(side, H - ty * side) });
      }
    }
    return out;
  }

  tile(url, fetchIt) {
    let img = this.tiles.get(url);
    if (!img && fetchIt) {
      img = new Image();
      img.onload = () => this.redraw();
      img.src = url;
      this.tiles.set(url, img);
      if (this.tiles.size > 600) this.tiles.delete(this.tiles.keys().next().value);
    }
    return img && img.complete && img.naturalWidth ? img : null;
  }

  // Draw `kind` tiles: coarser levels already loaded first (no blank while zooming), then this level.
  // fetch false: only the tiles already loaded.
  drawLayer(kind, extra, fetch = true) {
    const ctx = this.ctx;
    const z = this.level();
    let shown = 0;
    for (let lv = this.maxLevel(); lv >= z; lv--) {
      for (const t of this.visibleTiles(lv)) {
        const url = api.tileUrl(kind, this.image.name, lv, t.tx, t.ty, this.tileSide, extra);
        const img = this.tile(url, fetch && lv === z);
        if (!img) continue;
        const [sx, sy] = this.imageToScreen(t.x0, t.y0);
        ctx.drawImage(img, sx, sy, t.w * this.scale, t.h * this.scale);
        shown += lv === z;
      }
    }
    return shown;
  }

  draw() {
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.image) return;
    ctx.imageSmoothingEnabled = this.scale < 1;
    this.drawLayer("tile");
    this.overlayTilesShown = 0;
    const name = this.image.name;
    const has = this.layer === "changed" ? this.compared.has(name) : this.predicted.has(name);
    if (this.showOverlay && this.model && this.opacity > 0 && has) {
      ctx.globalAlpha = this.opacity;
      const extra = { layer: this.layer, model: this.model };
      if (this.layer === "live") {
        if (this.liveDrawn !== null && this.liveDrawn !== this.clicksVersion) {
          this.drawLayer("overlay", { ...extra, clicks: this.liveDrawn }, false); // until the new tiles come
        }
        extra.clicks = this.clicksVersion;
      }
      this.overlayTilesShown = this.drawLayer("overlay", extra);
      if (this.layer === "live" && this.overlayTilesShown) this.liveDrawn = this.clicksVersion;
      ctx.globalAlpha = 1;
    }
    for (const f of this.onDraw) f(ctx, this);
  }
}
