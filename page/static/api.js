// The server's HTTP API (see docs/annotate.md): JSON in, JSON out; a failed request throws with the server's message.

export async function get(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw Object.assign(new Error(body.error || r.statusText), { status: r.status });
  return body;
}

export async function post(path, data) {
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(data),
  });
  const body = await r.json();
  if (!r.ok) throw Object.assign(new Error(body.error || r.statusText), { status: r.status });
  return body;
}

// Bytes of `data` as post() sends it (the server's max_body counts these).
export function bodyBytes(data) {
  return new TextEncoder().encode(JSON.stringify(data)).length;
}

export function tileUrl(kind, image, z, x, y, size, extra) {
  const q = new URLSearchParams({ image, z, x, y, size, ...(extra || {}) });
  return `/api/${kind}?${q}`;
}
