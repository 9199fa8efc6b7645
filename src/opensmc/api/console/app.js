// The OpenSMC console: a page over the product's own SMC API (signed in the browser, see
// acs3.js) and its image routes. No framework and no build step: the server ships these files.
import { sign } from "./acs3.js";

const IMAGES = "/opensmc/v1/images";
const CONSOLE = "/opensmc/v1/console";
const REFRESH_MS = 2000;
const view = document.getElementById("view");
const bar = document.getElementById("bar");
let timer = null;
const samples = new Map(); // JobId -> [{t, p}] progress samples, for rate and ETA

// ---- small DOM helper: text goes through textContent, never innerHTML (names are user input)
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return el;
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

function gib(bytes) {
  return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
}

function say(text, kind = "info") {
  bar.replaceChildren(h("p", { class: kind, role: kind === "error" ? "alert" : "status" }, text));
}

// ---- credentials: sessionStorage only (gone when the browser session ends)
function cred() {
  const raw = sessionStorage.getItem("opensmc.cred");
  return raw ? JSON.parse(raw) : null;
}

class ApiError extends Error {
  constructor(status, body) {
    super(`${body.Code}: ${body.Message} (HTTP ${status}, RequestId ${body.RequestId || "-"})`);
    this.code = body.Code;
  }
}

export async function call(action, params = {}) {
  const c = cred();
  const { url, headers } = await sign(c, "POST", action, params);
  const res = await fetch(url, { method: "POST", headers });
  const body = await res.json().catch(() => ({ Code: "InvalidResponse", Message: res.statusText }));
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

async function imageGet(path, params = {}) {
  const { url, headers } = await sign(cred(), "GET", "DownloadImage", params, path);
  return fetch(url, { headers });
}

// The console routes: what no SMC action returns (events, bytes, last heartbeats).
async function consoleGet(path, action) {
  const { url, headers } = await sign(cred(), "GET", action, {}, `${CONSOLE}${path}`);
  const res = await fetch(url, { headers });
  const body = await res.json().catch(() => ({ Code: "InvalidResponse", Message: res.statusText }));
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

async function runBytes() {
  const body = await consoleGet("/progress", "DescribeJobProgress");
  return new Map(body.Jobs.map((j) => [j.JobId, j]));
}

function ago(time) {
  if (!time) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(time)) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : time;
}

async function all(action, wrapper, item, params = {}) {
  const out = [];
  for (let page = 1; ; page++) {
    const body = await call(action, { ...params, PageNumber: page, PageSize: 50 });
    const items = body[wrapper][item];
    out.push(...items);
    if (!items.length || out.length >= body.TotalCount) return out;
  }
}

function button(text, action, attrs = {}) {
  return h("button", {
    ...attrs,
    onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        await action();
      } catch (err) {
        say(err.message, "error");
      } finally {
        ev.target.disabled = false;
      }
    },
  }, text);
}

// ---- pages
async function sourcesPage() {
  const sources = await all("DescribeSourceServers", "SourceServers", "SourceServer");
  const seen = new Map((await consoleGet("/heartbeats", "DescribeSourceHeartbeats")).Sources
    .map((x) => [x.SourceId, x.LastHeartbeatTime]));
  const rows = sources.map((s) => {
    const disks = [s.Disks?.System, ...(s.Disks?.Data?.Data || [])].filter(Boolean);
    const diskText = disks.map((d, i) => {
      const parts = d.Parts?.Part || [];
      return `disk ${i}: ${d.Size} GiB (rounded up), ${parts.length} partition(s)` +
        (parts.length ? " (" + parts.map((p) => `${p.Path || "?"} ${gib(p.SizeBytes)}`).join(", ") + ")" : "");
    });
    return [
      s.SourceId, s.Name, h("span", { class: `state ${s.State}` }, s.State), `${s.Platform} ${s.Architecture}`,
      h("div", {}, diskText.map((t) => h("div", {}, t))),
      h("span", { class: "seen" }, `last seen ${ago(seen.get(s.SourceId))}, every ${s.HeartbeatRate} s` +
        (s.AgentVersion ? `, agent ${s.AgentVersion}` : "")),
      s.JobId ? h("a", { href: `#/jobs/${s.JobId}` }, s.JobId) : "",
      s.ErrorCode ? `${s.ErrorCode}: ${s.StatusInfo}` : "",
      s.State === "Available" ? button("Create job", () => createJob(s)) : "",
    ];
  });
  view.replaceChildren(
    h("h2", {}, "Sources"),
    sources.length ? table(["SourceId", "Name", "State", "OS", "Disks and partitions", "Agent", "Job", "Error", ""], rows)
      : h("p", {}, "No sources yet: create an activation code and run the agent command on a server."),
    h("h3", {}, "Add a source"),
    button("Create activation code", createToken, { id: "create-token" }),
    h("div", { id: "token" }),
  );
}

async function createToken() {
  const body = await call("CreateAccessToken", { Name: `console-${Date.now()}`, Count: 1, TimeToLiveInDays: 1 });
  const code = `--token-id ${body.AccessTokenId} --token-code ${body.AccessTokenCode}`;
  const args = `--server ${location.origin} ${code}`;
  document.getElementById("token").replaceChildren(
    h("p", {}, "Run on the source server (the code is shown once, valid for one registration within a day). " +
      "It installs the agent from this server (Python 3.6 or newer, nothing else) and starts it:"),
    h("pre", { id: "install-command" }, `curl -fsSL ${location.origin}/agent/install.sh | sudo sh -s -- ${code}`),
    h("p", {}, "or, without curl:"),
    h("pre", {}, `wget -qO- ${location.origin}/agent/install.sh | sudo sh -s -- ${code}`),
    h("p", {}, "or, where the opensmc package is installed, in the foreground:"),
    h("pre", { id: "agent-command" }, `opensmc agent run ${args}`),
  );
}

async function createJob(source) {
  const name = prompt("Name of the new replication job", `${source.Name}-job`.replace(/[^A-Za-z0-9:_-]/g, "-"));
  if (!name) return;
  const region = prompt("RegionId", "local");
  if (!region) return;
  const body = await call("CreateReplicationJob", { RegionId: region, SourceId: source.SourceId, Name: name });
  say(`Created ${body.JobId}`);
  location.hash = `#/jobs/${body.JobId}`;
}

function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

// Rate and ETA from the run's byte counts, sampled at each refresh (the last ten samples).
function rateAndEta(job, run) {
  const now = Date.now() / 1000;
  if (job.Status !== "Running" || !run) {
    samples.delete(job.JobId);
    return ["", ""];
  }
  const list = (samples.get(job.JobId) || []).filter((x) => x.run === run.RunId);
  list.push({ t: now, b: run.BytesDone, run: run.RunId });
  while (list.length > 10) list.shift();
  samples.set(job.JobId, list);
  const first = list[0];
  const db = run.BytesDone - first.b;
  const dt = now - first.t;
  if (db <= 0 || dt <= 0) return ["", ""];
  const perSecond = db / dt;
  return [`${size(perSecond)}/s`, `${Math.round((run.BytesTotal - run.BytesDone) / perSecond)} s`];
}

function progress(job, run) {
  const [rate, eta] = rateAndEta(job, run);
  const bytes = run && run.BytesTotal ? ` (${size(run.BytesDone)} of ${size(run.BytesTotal)})` : "";
  return h("div", {},
    h("progress", { max: 100, value: job.Progress }),
    ` ${job.Progress.toFixed(1)}%${bytes}`,
    rate ? h("div", { class: "rate" }, `rate ${rate}, ETA ${eta}`) : "");
}

function stateText(job) {
  return job.BusinessStatus ? `${job.Status}/${job.BusinessStatus}` : job.Status;
}

async function jobsPage() {
  const jobs = await all("DescribeReplicationJobs", "ReplicationJobs", "ReplicationJob");
  const bytes = await runBytes();
  const rows = jobs.map((j) => [
    h("a", { href: `#/jobs/${j.JobId}` }, j.JobId), j.Name, j.SourceId,
    h("span", { class: `state ${j.Status}`, "data-job": j.JobId }, stateText(j)),
    progress(j, bytes.get(j.JobId)),
    j.ImageId ? h("a", { href: "#/images" }, j.ImageId) : "",
    j.ErrorCode,
  ]);
  view.replaceChildren(h("h2", {}, "Replication jobs"),
    jobs.length ? table(["JobId", "Name", "SourceId", "Status", "Progress", "Image", "Error"], rows)
      : h("p", {}, "No jobs yet: create one from a source."));
  return true; // refresh while shown
}

async function jobPage(jobId) {
  const body = await call("DescribeReplicationJobs", { "JobId.1": jobId });
  const job = body.ReplicationJobs.ReplicationJob[0];
  if (!job) throw new Error(`no replication job ${jobId}`);
  const history = await consoleGet(`/jobs/${jobId}`, "DescribeJobHistory");
  const open = history.Runs.filter((r) => !r.EndTime).pop();
  const act = (label, action, params = {}) =>
    button(label, async () => {
      await call(action, { JobId: jobId, ...params });
      say(`${label}: done`);
      await show();
    }, { "data-action": action });
  const actions = [];
  if (["Ready", "Stopped", "InError"].includes(job.Status)) actions.push(act("Start", "StartReplicationJob"));
  if (job.Status === "Running" || job.Status === "Waiting") actions.push(act("Stop", "StopReplicationJob"));
  if (job.Status === "Waiting") actions.push(act("Cut over", "CutOverReplicationJob", { SyncData: "true" }));
  if (job.Status !== "Running") {
    actions.push(button("Delete", async () => {
      if (!confirm(`Delete ${jobId}?`)) return;
      await call("DeleteReplicationJob", { JobId: jobId });
      location.hash = "#/jobs";
    }, { "data-action": "DeleteReplicationJob" }));
  }
  let params = {};
  try {
    params = JSON.parse(job.ReplicationParameters || "{}");
  } catch {
    params = {};
  }
  const bandwidth = h("input", { type: "number", min: 0, id: "bandwidth", value: params.bandwidth_limit ?? 0 });
  const fields = ["Name", "SourceId", "RegionId", "JobType", "TargetType", "RunOnce", "Frequency",
    "MaxNumberOfImageToKeep", "ReplicationParameters", "NetMode", "CreationTime", "StartTime", "EndTime",
    "ScheduledStartTime", "ValidTime", "TransitionInstanceId", "ImageId"];
  view.replaceChildren(
    h("h2", {}, `Job ${jobId}`),
    h("p", {}, h("span", { class: `state ${job.Status}`, id: "job-status" }, stateText(job)), " ",
      progress(job, open && job.Status === "Running" ? open : undefined)),
    job.ErrorCode ? h("p", { class: "error" }, `${job.ErrorCode}: ${job.StatusInfo}`) : (job.StatusInfo ? h("p", {}, job.StatusInfo) : ""),
    h("div", { class: "actions" }, actions),
    job.Status === "Running" ? h("p", {}, "Bandwidth limit (Mbit/s, 0 = none): ", bandwidth, " ",
      button("Apply", async () => {
        const next = { ...params, bandwidth_limit: Number(bandwidth.value) };
        await call("ModifyReplicationJobAttribute", { JobId: jobId, ReplicationParameters: JSON.stringify(next) });
        say(`bandwidth limit set to ${bandwidth.value} Mbit/s`);
      }, { id: "apply-bandwidth" })) : "",
    h("h3", {}, "Parameters"),
    table(["Parameter", "Value"], fields.map((f) => [f, String(job[f] ?? "")])),
    h("h3", {}, "Runs"),
    history.Runs.length ? table(["Run", "Type", "Start", "End", "Bytes", "Image", "Checksum"], history.Runs.map((r) => [
      r.RunId, r.Type, r.StartTime, r.EndTime, `${size(r.BytesDone)} of ${size(r.BytesTotal)}`, r.ImageId,
      r.ChecksumVerified === true ? "verified" : r.ChecksumVerified === false ? "FAILED" : "-",
    ])) : h("p", {}, "No run yet."),
    h("h3", {}, "Events"),
    table(["Time", "Event", "From", "To", "Detail"], history.Events.map((e) => [
      e.Time, e.Event, e.From, e.To, Object.entries(e.Detail || {}).map(([k, v]) => `${k}=${v}`).join(" "),
    ]), { id: "events" }),
    h("h3", {}, "Tags"),
    h("p", {}, (job.Tags?.Tag || []).map((t) => `${t.Key}=${t.Value}`).join(", ") || "none"),
  );
  return job.Status === "Running" || job.Status === "Waiting" || job.Status === "Deleting";
}

async function download(image, disk) {
  say(`downloading disk ${disk.Index} of ${image.ImageId}…`);
  const res = await imageGet(`${IMAGES}/${image.ImageId}/disks/${disk.Index}`, { format: "raw" });
  if (!res.ok) throw new ApiError(res.status, await res.json());
  // Reading the body to its end is what proves the disk: the server aborts a corrupt one mid-stream.
  const blob = await res.blob();
  const a = h("a", { href: URL.createObjectURL(blob), download: `${image.ImageId}-disk${disk.Index}.raw` });
  document.body.append(a);
  a.click();
  a.remove();
  say(`disk ${disk.Index} of ${image.ImageId} downloaded (${blob.size} bytes, checked by the server)`);
}

async function verify(image) {
  for (const disk of image.Disks) {
    say(`verifying disk ${disk.Index} of ${image.ImageId}…`);
    const res = await imageGet(`${IMAGES}/${image.ImageId}/disks/${disk.Index}`, { format: "raw" });
    if (!res.ok) throw new ApiError(res.status, await res.json());
    const reader = res.body.getReader();
    try {
      for (;;) if ((await reader.read()).done) break;
    } catch {
      throw new Error(`disk ${disk.Index} of ${image.ImageId} FAILED verification (the server log says which chunk)`);
    }
  }
  say(`${image.ImageId}: every chunk and every disk's SHA-256 check out`);
  await show();
}

async function imagesPage() {
  const res = await imageGet(IMAGES);
  const body = await res.json();
  if (!res.ok) throw new ApiError(res.status, body);
  const images = body.Images.Image;
  const rows = images.map((m) => [
    m.ImageId, m.Name || "", m.JobId ? h("a", { href: `#/jobs/${m.JobId}` }, m.JobId) : "", m.State, m.CreationTime,
    h("div", {}, m.Disks.map((d) => h("div", {}, `disk ${d.Index}: ${gib(d.Size)} `,
      button("Download raw", () => download(m, d), { "data-download": `${m.ImageId}/${d.Index}` })))),
    h("span", { class: "checksum", "data-image": m.ImageId },
      m.ChecksumVerified === true ? "verified" : m.ChecksumVerified === false ? "FAILED" : "-"),
    button("Verify", () => verify(m), { "data-verify": m.ImageId }),
  ]);
  view.replaceChildren(h("h2", {}, "Images"),
    images.length ? table(["ImageId", "Name", "Job", "State", "Created", "Disks", "Checksum", ""], rows)
      : h("p", {}, "No images yet: a finished job run makes one."));
}

async function workgroupsPage() {
  const groups = await all("DescribeWorkgroups", "Workgroups", "Workgroup");
  const name = h("input", { id: "wg-name", placeholder: "name" });
  view.replaceChildren(h("h2", {}, "Workgroups"),
    groups.length ? table(["WorkgroupId", "Name", "Status", "Description", "Tags"], groups.map((g) => [
      g.WorkgroupId, g.Name, g.Status, g.Description, (g.Tags?.Tag || []).map((t) => `${t.Key}=${t.Value}`).join(", "),
    ])) : h("p", {}, "No workgroups."),
    h("p", {}, name, " ", button("Create workgroup", async () => {
      await call("CreateWorkgroup", { Name: name.value });
      await show();
    })));
}

// ---- routing
const routes = [
  [/^#\/sources$/, sourcesPage], [/^#\/jobs$/, jobsPage], [/^#\/jobs\/([\w-]+)$/, jobPage],
  [/^#\/images$/, imagesPage], [/^#\/workgroups$/, workgroupsPage],
];

async function show() {
  clearTimeout(timer);
  if (!cred()) return signIn();
  document.body.classList.add("signed-in");
  const hash = location.hash || "#/jobs";
  for (const [re, page] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    try {
      const live = await page(...m.slice(1));
      if (live) timer = setTimeout(refresh, REFRESH_MS); // live progress: poll while something can change
    } catch (err) {
      say(err.message, "error");
      if (err.code && err.code.startsWith("InvalidAccessKeyId")) signOut();
    }
    return;
  }
  location.hash = "#/jobs";
}

// A refresh re-renders the page: not while the user is typing into one of its fields.
function refresh() {
  const active = document.activeElement;
  if (active && active.tagName === "INPUT" && view.contains(active)) {
    timer = setTimeout(refresh, REFRESH_MS);
    return;
  }
  show();
}

function signIn() {
  document.body.classList.remove("signed-in");
  const id = h("input", { id: "key-id", autocomplete: "username", required: true });
  const secret = h("input", { id: "key-secret", type: "password", autocomplete: "current-password", required: true });
  view.replaceChildren(h("form", {
    id: "sign-in",
    onsubmit: async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem("opensmc.cred", JSON.stringify({ id: id.value.trim(), secret: secret.value.trim() }));
      try {
        await call("DescribeSourceServers", { PageSize: 1 });
        say("signed in");
        await show();
      } catch (err) {
        sessionStorage.removeItem("opensmc.cred");
        say(err.message, "error");
      }
    },
  }, h("h2", {}, "Sign in"),
  h("p", {}, "With an AccessKey pair of your account (kept in this browser tab's session only)."),
  h("label", {}, "AccessKey ID ", id), h("label", {}, "AccessKey secret ", secret),
  h("button", { type: "submit" }, "Sign in")));
}

function signOut() {
  sessionStorage.removeItem("opensmc.cred");
  show();
}

document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", show);
show();
