// The server's HTTP API (see docs/annotate.md): JSON in, JSON out; a failed request throws with the server's message.
"use strict";

const api = {
  async get(path) {
    const r = await fetch(path, { cache: "no-store" });
    const body = await r.json();
    if (!r.ok) throw Object.assign(new Error(body.error || r.statusText), { status: r.status });
    return body;
  },

  async post(path, data) {
    const r = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(data),
    });
    const body = await r.json();
    if (!r.ok) throw Object.assign(new Error(body.error || r.statusText), { status: r.status });
    return body;
  },

  tileUrl(kind, image, z, x, y, size, extra) {
    const q = new URLSearchParams({ image, z, x, y, size, ...(extra || {}) });
    return `/api/${kind}?${q}`;
  },
};
