// The explainrt page: upload an image, show the top-5 predictions and the chosen methods' maps.
"use strict";

const DEFAULT_METHODS = ["gradcam", "contrast-cam", "occlusion", "rise"];
// Options that keep the perturbation methods interactive on a CPU (editable on the page).
const DEFAULT_OPTIONS = { occlusion: { window: [32, 32], stride: [16, 16] } };
const $ = (id) => document.getElementById(id);
let imageB64 = null;

async function call(path, body) {
  const started = performance.now();
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return { data, ms: performance.now() - started };
}

function ms(seconds) { return seconds === undefined ? "" : `${(seconds * 1000).toFixed(1)} ms`; }

function percent(p) { return `${(p * 100).toFixed(1)}%`; }

async function init() {
  const [{ data: models }, { data: methods }] = await Promise.all([call("/v1/models"), call("/api/methods")]);
  $("model").replaceChildren(...models.models.map((name) => new Option(name, name)));
  $("methods").replaceChildren(...methods.methods.map((method) => {
    const label = document.createElement("label");
    label.title = method.summary;
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: method.name, checked: DEFAULT_METHODS.includes(method.name) });
    label.append(box, method.name);
    if (method.options.length) {
      const options = Object.assign(document.createElement("input"), {
        className: "options", placeholder: method.options.map((o) => o.name).join(", "),
        title: `options (JSON): ${method.options.map((o) => `${o.name} (default ${JSON.stringify(o.default)}): ${o.help}`).join("; ")}`,
        value: DEFAULT_OPTIONS[method.name] ? JSON.stringify(DEFAULT_OPTIONS[method.name]) : "",
      });
      options.dataset.method = method.name;
      label.append(options);
    }
    return label;
  }));
}

function chosenMethods() {
  return [...$("methods").querySelectorAll("input:checked")].map((box) => box.value);
}

function showPredictions(predictions) {
  const top = predictions[0].top_k;
  $("predictions").replaceChildren(...top.map((p) => {
    const item = document.createElement("li");
    item.className = "prediction";
    const bar = Object.assign(document.createElement("span"), { className: "bar" });
    bar.style.width = `${Math.max(2, p.probability * 160)}px`;
    item.append(`${p.label ?? p.index} `, Object.assign(document.createElement("span"), { className: "muted", textContent: percent(p.probability) }), bar);
    return item;
  }));
  const previous = $("contrast").value;
  $("contrast").replaceChildren(...top.slice(1).map((p) => new Option(`${p.label ?? p.index} (${p.index})`, p.index)));
  if ([...$("contrast").options].some((o) => o.value === previous)) $("contrast").value = previous;
}

function timingRow(name, timings, roundTrip) {
  const row = document.createElement("tr");
  for (const text of [name, timings.batch_images ?? "", ms(timings.runtime), ms(timings.total), `${roundTrip.toFixed(1)} ms`]) {
    row.append(Object.assign(document.createElement("td"), { textContent: text }));
  }
  return row;
}

async function explainWith(method, model) {
  const figure = document.createElement("figure");
  figure.dataset.method = method;
  $("maps").append(figure);
  const field = $("methods").querySelector(`input.options[data-method="${method}"]`);
  let parameters;
  try {
    parameters = { ...(field && field.value.trim() ? JSON.parse(field.value) : {}), method, return: ["overlay"], caption: $("caption").checked };
  } catch (error) {
    figure.className = "failed";
    figure.textContent = `${method}: options are not valid JSON: ${error.message}`;
    return;
  }
  if (method === "contrast-cam" && $("contrast").value !== "" && parameters.top_k === undefined) parameters.contrast = Number($("contrast").value);
  try {
    const { data, ms: roundTrip } = await call(`/v1/models/${model}:explain`, { instances: [{ image: { b64: imageB64 } }], parameters });
    const explanation = data.explanations[0];
    const image = Object.assign(document.createElement("img"), { className: "overlay", alt: `${method} map` });
    const loaded = new Promise((resolve) => { image.onload = resolve; image.onerror = resolve; });
    image.src = `data:image/png;base64,${explanation.overlay.b64}`;
    const caption = document.createElement("figcaption");
    const against = parameters.contrast !== undefined ? ` vs ${$("contrast").selectedOptions[0]?.text ?? parameters.contrast}` : "";
    caption.innerHTML = `<b></b><br><span class="muted"></span>`;
    caption.querySelector("b").textContent = method;
    caption.querySelector("span").textContent = `${explanation.target.label ?? explanation.target.index}${against} · ${ms(data.timings.total)}`;
    figure.append(image, caption);
    if (explanation.note) {
      const note = Object.assign(document.createElement("p"), { className: "note muted" });
      note.textContent = explanation.note;
      figure.append(note);
    }
    $("timings").tBodies[0].append(timingRow(method, data.timings, roundTrip));
    await loaded;
  } catch (error) {
    figure.className = "failed";
    figure.textContent = `${method}: ${error.message}`;
  }
}

async function run() {
  if (!imageB64) return;
  document.body.dataset.state = "running";
  $("run").disabled = true;
  $("error").textContent = "";
  $("maps").replaceChildren();
  $("timings").tBodies[0].replaceChildren();
  const model = $("model").value;
  try {
    const { data, ms: roundTrip } = await call(`/v1/models/${model}:predict`, { instances: [{ image: { b64: imageB64 } }] });
    showPredictions(data.predictions);
    $("timings").tBodies[0].append(timingRow("predict", {}, roundTrip));
    for (const method of chosenMethods()) await explainWith(method, model);  // one at a time: the server batches across clients
    document.body.dataset.state = "done";
  } catch (error) {
    $("error").textContent = error.message;
    document.body.dataset.state = "error";
  } finally {
    $("run").disabled = false;
  }
}

function load(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    $("preview").src = reader.result;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    imageB64 = String(reader.result).split(",")[1];
    run();
  };
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (event) => load(event.target.files[0]));
$("run").addEventListener("click", run);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); load(event.dataTransfer.files[0]); });
init().catch((error) => { $("error").textContent = `cannot reach the server: ${error.message}`; });
