// ACS3-HMAC-SHA256 request signing in the browser (WebCrypto), exactly as the server
// verifies it (opensmc/api/signing.py): the console calls the product's own SMC API,
// like any SDK, with the AccessKey pair the user typed in. Nothing is sent but signatures.

const enc = new TextEncoder();
const EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
export const API_VERSION = "2019-06-01";

// RFC 3986: only A-Za-z0-9-_.~ stay literal (encodeURIComponent also keeps !'()*).
export function pct(s) {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
}

function hex(buf) {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function sha256hex(text) {
  return hex(await crypto.subtle.digest("SHA-256", enc.encode(text)));
}

async function hmacHex(secret, text) {
  const key = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
  ]);
  return hex(await crypto.subtle.sign("HMAC", key, enc.encode(text)));
}

export function canonicalQuery(params) {
  return Object.entries(params)
    .map(([k, v]) => [k, String(v)])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0))
    .map(([k, v]) => `${pct(k)}=${pct(v)}`)
    .join("&");
}

function timestamp() {
  return new Date().toISOString().replace(/\.\d{3}Z$/, "Z");
}

function nonce() {
  return hex(crypto.getRandomValues(new Uint8Array(16)));
}

// -> {url, headers}: send with fetch(url, {method, headers}) and an empty body.
export async function sign(cred, method, action, params, path = "/") {
  const query = canonicalQuery(params);
  const headers = {
    host: location.host,
    "x-acs-action": action,
    "x-acs-content-sha256": EMPTY_SHA256,
    "x-acs-date": timestamp(),
    "x-acs-signature-nonce": nonce(),
    "x-acs-version": API_VERSION,
  };
  const names = Object.keys(headers).sort();
  const canonical = [
    method,
    path,
    query,
    names.map((n) => `${n}:${headers[n].trim()}\n`).join(""),
    names.join(";"),
    EMPTY_SHA256,
  ].join("\n");
  const toSign = `ACS3-HMAC-SHA256\n${await sha256hex(canonical)}`;
  const signature = await hmacHex(cred.secret, toSign);
  delete headers.host; // the browser sends Host itself (it is a forbidden header name for fetch)
  headers.accept = "application/json";
  headers.authorization = `ACS3-HMAC-SHA256 Credential=${cred.id},SignedHeaders=${names.join(";")},Signature=${signature}`;
  return { url: `${path}${query ? "?" + query : ""}`, headers };
}
