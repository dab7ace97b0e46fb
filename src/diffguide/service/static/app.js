// diffguide's web page: plain JavaScript over the HTTP API (no build step).
"use strict";

const key = new URLSearchParams(location.search).get("api_key");
const $ = (id) => document.getElementById(id);

function url(path) {  // links and event streams cannot send headers: the key goes in the query
  if (!key) return path;
  return path + (path.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(key);
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, { ...options, headers });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.error) || response.statusText);
  return body;
}

function showError(err) {
  $("error").textContent = err ? String(err.message || err) : "";
  $("error").hidden = !err;
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label ?? value;
  select.appendChild(o);
}

async function loadOptions() {
  const [models, options] = await Promise.all([api("/v1/models"), api("/v1/options")]);
  $("model").replaceChildren();
  for (const m of models.models) option($("model"), m.name);
  $("scheduler").replaceChildren();
  for (const s of options.schedulers) option($("scheduler"), s);
  $("scheduler").value = options.defaults.scheduler;
  $("steps").value = options.defaults.steps;
  await loadLayers();
}

async function loadLayers() {  // the layer picker: presets and units from the dry run
  const report = await api(`/v1/models/${encodeURIComponent($("model").value)}/layers`);
  for (const method of ["pag", "tpg"]) {
    const select = $(method + "-layers");
    select.replaceChildren();
    const preset = report.presets[method];
    option(select, "", preset.spec ? `preset (${preset.spec})` : "preset");
    option(select, "mid", "mid");
    for (const u of report.units) option(select, u.name, `${u.alias} ${u.name}`);
  }
}

function window_(method) {
  const start = parseFloat($(method + "-start").value), end = parseFloat($(method + "-end").value);
  return start === 0 && end === 1 ? null : { start, end };
}

function request() {
  const prompts = $("prompt").value.split("\n").map((p) => p.trim()).filter(Boolean);
  const guidance = [{ method: "cfg", scale: parseFloat($("cfg").value) }];
  for (const method of ["pag", "tpg"]) {
    const scale = parseFloat($(method).value);
    if (scale > 0) {
      const term = { method, scale, window: window_(method) };
      if ($(method + "-layers").value) term.layers = $(method + "-layers").value;
      guidance.push(term);
    }
  }
  const body = {
    model: $("model").value,
    prompt: prompts.length === 1 ? prompts[0] : prompts,
    negative_prompt: $("negative").value,
    guidance,
    seed: parseInt($("seed").value, 10),
    steps: parseInt($("steps").value, 10),
    scheduler: $("scheduler").value,
  };
  const count = parseInt($("count").value, 10);
  if (count > 1 && prompts.length === 1) body.num_images = count;
  if ($("size").value) body.width = body.height = parseInt($("size").value, 10);
  if ($("vae-preview").checked) body.vae_preview_every = 2;
  return body;
}

function follow(job) {  // live progress from the job's event stream
  $("progress-panel").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = "queued";
  $("preview").hidden = true;
  return new Promise((resolve) => {
    const events = new EventSource(url(`/v1/jobs/${job.id}/events`));
    events.addEventListener("step", (e) => {
      const data = JSON.parse(e.data);
      $("progress").max = data.steps;
      $("progress").value = data.step;
      $("progress-text").textContent = `step ${data.step} of ${data.steps}`;
      const shown = job.request.vae_preview_every ? data.vae_preview : data.preview;
      if (shown) { $("preview").src = shown; $("preview").hidden = false; }
    });
    events.addEventListener("end", (e) => {
      const data = JSON.parse(e.data);
      events.close();
      $("progress-text").textContent = data.state + (data.error ? ": " + data.error : "");
      if (data.error) showError(data.error);
      resolve(data);
    });
  });
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  $("submit").disabled = true;
  try {
    const job = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request()),
    });
    await follow(job);
    await loadGallery(job.id);
  } catch (err) {
    showError(err);
  } finally {
    $("submit").disabled = false;
  }
}

function describe(job) {
  const r = job.request;
  const prompt = Array.isArray(r.prompt) ? r.prompt.join(" | ") : r.prompt;
  return `${job.id.slice(0, 6)} · ${prompt} · seed ${r.seed}`;
}

async function loadGallery(selectId) {
  const jobs = (await api("/v1/jobs")).filter((j) => j.state === "succeeded");
  const gallery = $("gallery");
  gallery.replaceChildren();
  for (const select of [$("compare-a"), $("compare-b")]) {
    const previous = select.value;
    select.replaceChildren();
    for (const job of jobs) option(select, job.id, describe(job));
    if (previous) select.value = previous;
  }
  if (jobs.length > 1) {
    $("compare-a").value = $("compare-a").value || jobs[jobs.length - 2].id;
    if ($("compare-b").value === $("compare-a").value) $("compare-b").value = jobs[jobs.length - 1].id;
  }
  for (const job of jobs) {
    for (let i = 0; i < job.images; i++) {
      const img = document.createElement("img");
      img.src = url(`/v1/jobs/${job.id}/images/${i}`);
      img.alt = describe(job);
      img.title = describe(job);
      img.dataset.job = job.id;
      img.dataset.index = i;
      img.addEventListener("click", () => showDetails(job, i, img));
      gallery.appendChild(img);
      if (job.id === selectId && i === 0) showDetails(job, i, img);
    }
  }
}

async function showDetails(job, index, img) {
  for (const other of document.querySelectorAll("#gallery img")) other.classList.remove("selected");
  img.classList.add("selected");
  const manifests = await api(`/v1/jobs/${job.id}/manifest`);
  $("details").hidden = false;
  $("details-title").textContent = `job ${job.id}, image ${index}`;
  $("details-image").src = url(`/v1/jobs/${job.id}/images/${index}`);
  $("manifest").textContent = JSON.stringify(manifests[index], null, 2);
}

function fmt(x) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number" || Number.isInteger(x)) return String(x);
  return x.toPrecision(4);
}

async function compare() {
  showError(null);
  const a = $("compare-a").value, b = $("compare-b").value;
  try {
    const report = await api(`/v1/compare?a=${a}&b=${b}`);
    $("compare-img-a").src = url(`/v1/jobs/${a}/images/0`);
    $("compare-img-b").src = url(`/v1/jobs/${b}/images/0`);
    $("heatmap").src = url(`/v1/compare/heatmap?a=${a}&b=${b}`);
    const rows = [["", "latents", "pixels"]];
    for (const k of ["allclose", "max_abs_err", "mean_abs_err", "max_rel_err", "violations", "violation_fraction"]) {
      rows.push([k, fmt(report.latents[k]), fmt(report.pixels[k])]);
    }
    rows.push(["identical", String(report.identical), ""]);
    $("report").replaceChildren(...rows.map((r, i) => {
      const tr = document.createElement("tr");
      for (const cell of r) {
        const td = document.createElement(i === 0 ? "th" : "td");
        td.textContent = cell;
        tr.appendChild(td);
      }
      return tr;
    }));
    $("compare-result").hidden = false;
  } catch (err) {
    showError(err);
  }
}

for (const id of ["cfg", "pag", "tpg"]) {
  $(id).addEventListener("input", () => { $(id + "-out").textContent = $(id).value; });
}
$("job-form").addEventListener("submit", submit);
$("model").addEventListener("change", () => loadLayers().catch(showError));
$("compare").addEventListener("click", compare);
loadOptions().then(() => loadGallery()).catch(showError);
api("/healthz").then((h) => { $("health").textContent = `v${h.version}`; }).catch(showError);
