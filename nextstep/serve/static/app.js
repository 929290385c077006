// The NextStep page: posts to the streaming endpoints and reads Server-Sent Events with fetch + ReadableStream
// (EventSource cannot POST). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "generate";
let info = null;        // GET /health
let controller = null;  // AbortController of the running request
let inputSize = null;   // [w, h] of the chosen edit image
let results = [];       // every image made on this page, oldest first: {id, b64, prompt, size, seed, parent}
let source = null;      // the edit's input: {blob, name, result (its results entry, or null for a file)}
const KEY_STORE = "nextstep-api-key";  // sessionStorage: the key lasts as long as the tab
let apiKey = sessionStorage.getItem(KEY_STORE) || "";

// The Authorization header, when the server asked for a key and the user gave one.
function authHeaders() { return apiKey ? { Authorization: `Bearer ${apiKey}` } : {}; }

function askForKey(message) {
  $("key-form").hidden = false;
  $("api-key").focus();
  setError(message);
}

function useKey(event) {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  $("key-form").hidden = true;
  setError("");
  loadInfo();
}

function setError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function setStatus(message) { $("status").textContent = message; }

// The preview back to its placeholder: a failed request must not leave the last result looking like its own.
function clearPreview() {
  const p = document.createElement("p");
  p.className = "muted";
  p.textContent = "The image appears here token by token.";
  $("preview").replaceChildren(p);
  $("preview").dataset.count = "0";
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

function fastMode() { return Boolean(info && info.fast.available && $("fast").checked); }

function placeholders() {
  if (!info) return;
  const fast = fastMode();
  const d = (fast ? info.fast : info.defaults)[mode === "edit" ? "edit" : "generation"];
  for (const id of ["guidance", "image-guidance", "sampler", "time-shift", "negative"]) $(id).disabled = fast;
  $("negative").placeholder = d.negative_prompt ? d.negative_prompt : "(none)";
  $("steps").placeholder = d.steps;
  if (!fast) $("sampler").value = d.sampler;
  $("guidance").placeholder = d.guidance_scale;
  $("time-shift").placeholder = d.time_shift;
  if (d.image_guidance_scale !== undefined) $("image-guidance").placeholder = d.image_guidance_scale;
}

function switchTab(next) {
  mode = next;
  for (const [id, name] of [["tab-generate", "generate"], ["tab-edit", "edit"]]) {
    $(id).classList.toggle("active", name === mode);
    $(id).setAttribute("aria-selected", String(name === mode));
  }
  $("edit-fields").hidden = mode !== "edit";
  $("image-guidance-box").hidden = mode !== "edit";
  $("prompt-label").textContent = mode === "edit" ? "Instruction" : "Prompt";
  $("generate").textContent = mode === "edit" ? "Edit" : "Generate";
  placeholders();
  if (mode === "edit" && inputSize) fitSize(...inputSize);
}

// A size the model was not trained at draws noise (the bundled model knows only 64x64): say so next to the size.
function sizeNote() {
  const trained = info ? info.model.trained_sizes : [], size = `${$("width").value}x${$("height").value}`;
  $("size-note").hidden = !trained.length || trained.includes(size);
  $("size-note").textContent = `This model was trained at ${trained.join(", ")} only: at ${size} it may draw noise.`;
}

// The edit size: the input's own size when the server accepts it, else scaled to fit, in multiples of the token.
function fitSize(w, h) {
  const m = info ? info.model.size_multiple : 16, max = info ? info.limits.max_size : 512;
  const s = Math.min(1, max / Math.max(w, h));
  $("width").value = Math.max(m, Math.floor((w * s) / m) * m);
  $("height").value = Math.max(m, Math.floor((h * s) / m) * m);
  sizeNote();
}

async function loadInfo() {
  try {
    const res = await fetch("/health", { headers: authHeaders() });
    if (res.status === 401) { askForKey(await errorMessage(res)); return; }
    info = await res.json();
  } catch (e) {
    $("model-info").textContent = "server unreachable";
    setError(`Could not reach the server: ${e.message}`);
    return;
  }
  const m = info.model, l = info.limits;
  $("model-info").textContent =
    `${m.name} · ${(m.parameters / 1e6).toFixed(1)}M parameters · ${m.device} ${m.dtype} · queue ${info.queue.depth}`;
  const [w, h] = info.defaults.size.split("x");
  $("width").value = w; $("height").value = h;
  for (const id of ["width", "height"]) { $(id).max = l.max_size; $(id).step = m.size_multiple; $(id).min = m.size_multiple; }
  $("n").max = l.max_n; $("steps").max = l.max_steps; $("seed").max = l.max_seed;
  $("guidance").max = l.max_guidance; $("image-guidance").max = l.max_guidance; $("time-shift").max = l.max_time_shift;
  $("sampler").replaceChildren(...l.samplers.map((s) => new Option(s, s)));
  $("fast-box").hidden = !info.fast.available;
  placeholders();
  sizeNote();
}

// Fields as the API names them; empty optional fields are left out so the server's defaults apply.
function fields() {
  const f = { prompt: $("prompt").value, n: $("n").value, size: `${$("width").value}x${$("height").value}`,
              negative_prompt: $("negative").value, steps: $("steps").value, guidance_scale: $("guidance").value,
              seed: $("seed").value, sampler: $("sampler").value, time_shift: $("time-shift").value };
  if (mode === "edit") f.image_guidance_scale = $("image-guidance").value;
  if (fastMode()) {  // the distilled head's guidance, sampler and shift are fixed: only the steps may change
    for (const k of ["guidance_scale", "image_guidance_scale", "sampler", "time_shift", "negative_prompt"]) delete f[k];
    f.fast = true;
  }
  for (const k of Object.keys(f)) if (f[k] === "" && k !== "prompt") delete f[k];
  return f;
}

function jsonBody(f) {
  const numbers = ["n", "steps", "seed"], floats = ["guidance_scale", "time_shift", "image_guidance_scale"];
  const out = {};
  for (const [k, v] of Object.entries(f)) {
    if (numbers.includes(k)) out[k] = /^-?\d+$/.test(v) ? Number(v) : v;
    else if (floats.includes(k)) out[k] = v !== "" && !isNaN(Number(v)) ? Number(v) : v;
    else out[k] = v;
  }
  return JSON.stringify(out);
}

async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      yield { event, data: data.length ? JSON.parse(data.join("\n")) : null };
    }
  }
}

function showImages(container, images) {
  const imgs = container.querySelectorAll("img");
  if (imgs.length !== images.length) {
    container.replaceChildren(...images.map(() => document.createElement("img")));
  }
  container.querySelectorAll("img").forEach((img, i) => {
    img.src = `data:image/png;base64,${images[i]}`;
    img.alt = "preview";
  });
}

function addToGallery(result, request, parent) {
  const figures = result.data.map((item, i) => {
    const entry = { id: results.length + 1, b64: item.b64_json, prompt: request.prompt, size: result.size,
                    seed: result.seed, parent };
    results.push(entry);
    const url = `data:image/png;base64,${item.b64_json}`;
    const fig = document.createElement("figure");
    fig.id = `result-${entry.id}`;
    const img = document.createElement("img");
    img.src = url;
    img.alt = request.prompt;
    const cap = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = url;
    link.download = `nextstep-${result.seed}-${i}.png`;
    link.textContent = "Download PNG";
    const from = parent === undefined ? "" : parent ? `edit of #${parent.id}: ` : "edit: ";
    cap.append(`#${entry.id} · ${from}${request.prompt} · ${result.size} · seed ${result.seed} · `, link);
    const again = document.createElement("button");
    again.type = "button";
    again.className = "edit-this";
    again.textContent = "Edit this";
    again.addEventListener("click", () => editResult(entry));
    fig.append(img, cap, again);
    return fig;
  });
  $("gallery").prepend(...figures);  // newest request first, its images in order
}

function dataBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

// The edit's input image: a file the user chose, or a result of this page (whose own input it can step back to).
function setSource(next) {
  source = next;
  const thumb = $("image-thumb");
  thumb.hidden = !next;
  for (const fig of document.querySelectorAll("#gallery figure")) fig.classList.remove("source");
  const from = next && next.result;
  if (from) $(`result-${from.id}`).classList.add("source");
  $("source-info").hidden = !from;
  $("source-back").hidden = !(from && from.parent);
  if (from) {
    $("source-label").textContent = `Editing result #${from.id}`;
    if (from.parent) $("source-back").textContent = `Back to #${from.parent.id}`;
  }
  if (!next) { inputSize = null; return; }
  thumb.onload = () => { inputSize = [thumb.naturalWidth, thumb.naturalHeight]; fitSize(...inputSize); };
  thumb.onerror = () => setError("That file is not an image this browser can read.");
  thumb.src = URL.createObjectURL(next.blob);
}

// "Edit this" on a result: it becomes the input of the next edit (the Edit tab, a fresh instruction).
function editResult(entry) {
  $("image").value = "";
  setSource({ blob: dataBlob(entry.b64), name: `result-${entry.id}.png`, result: entry });
  if (mode !== "edit") switchTab("edit");
  $("prompt").value = "";
  $("prompt").focus();
  setError("");
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `the server answered ${res.status} ${res.statusText}`;
}

async function run(event) {
  event.preventDefault();
  setError("");
  const f = fields();
  if (!f.prompt.trim()) { setError("Please write a prompt."); return; }
  let url, init, parent;
  if (mode === "edit") {
    if (!source) { setError("Please choose an image to edit."); return; }
    parent = source.result;  // null: a file the user chose
    const form = new FormData();
    form.append("image", source.blob, source.name);
    for (const [k, v] of Object.entries(f)) form.append(k, v);
    url = "/v1/images/edits/stream";
    init = { method: "POST", headers: authHeaders(), body: form };
  } else {
    url = "/v1/images/generations/stream";
    init = { method: "POST", headers: { ...authHeaders(), "Content-Type": "application/json" }, body: jsonBody(f) };
  }
  controller = new AbortController();
  setBusy(true);
  clearPreview();
  setStatus("Sending…");
  $("progress").value = 0;
  const started = performance.now();
  try {
    const res = await fetch(url, { ...init, signal: controller.signal });
    if (res.status === 401) { askForKey(await errorMessage(res)); setStatus(""); return; }
    if (!res.ok) { setError(await errorMessage(res)); setStatus(""); return; }
    let finished = false;
    for await (const { event: name, data } of serverEvents(res)) {
      if (name === "queued") {
        setStatus(data.position ? `Queued: ${data.position} request(s) ahead…` : "Starting…");
      } else if (name === "started") {
        setStatus(`Generating ${data.total} tokens…`);
      } else if (name === "progress") {
        $("progress").max = data.total;
        $("progress").value = data.step;
        setStatus(`Token ${data.step} of ${data.total}`);
      } else if (name === "preview") {
        showImages($("preview"), data.images);
        $("preview").dataset.count = Number($("preview").dataset.count) + 1;
      } else if (name === "final") {
        finished = true;
        showImages($("preview"), data.data.map((d) => d.b64_json));
        addToGallery(data, f, parent);
        setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s (seed ${data.seed}).`);
      } else if (name === "error") {
        finished = true;
        clearPreview();
        setError(data.error.message);
        setStatus("");
      }
    }
    if (!finished) setError("The connection closed before the image was finished.");
  } catch (e) {
    if (e.name === "AbortError") setStatus("Cancelled.");
    else setError(`Could not reach the server: ${e.message}`);
  } finally {
    controller = null;
    setBusy(false);
  }
}

function pickImage() {
  const file = $("image").files[0];
  setSource(file ? { blob: file, name: file.name, result: null } : null);
  setError("");
}

$("tab-generate").addEventListener("click", () => switchTab("generate"));
$("tab-edit").addEventListener("click", () => switchTab("edit"));
$("form").addEventListener("submit", run);
$("cancel").addEventListener("click", () => controller && controller.abort());
$("image").addEventListener("change", pickImage);
$("fast").addEventListener("change", placeholders);
for (const id of ["width", "height"]) $(id).addEventListener("input", sizeNote);
$("key-form").addEventListener("submit", useKey);
$("source-back").addEventListener("click", () => source && source.result && source.result.parent &&
                                  editResult(source.result.parent));
loadInfo();
