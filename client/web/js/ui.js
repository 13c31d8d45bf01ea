// Small view helpers: meters, statistics, transcript, settings form, downloads.

import { SAMPLING_PARAMS } from "./protocol.js";

const $ = (id) => document.getElementById(id);

/** Level meter: dB-scaled fill with a fast attack and a slow release. */
export class LevelMeter {
  constructor(element) {
    this.element = element;
    this.fill = element.querySelector(".meter-fill");
    this.value = 0;
  }

  update(rms) {
    const db = 20 * Math.log10(Math.max(rms, 1e-5)); // -100 .. 0
    const level = Math.min(1, Math.max(0, (db + 60) / 60));
    this.value = level > this.value ? level : this.value * 0.85 + level * 0.15;
    this.fill.style.transform = `scaleX(${this.value.toFixed(3)})`;
    this.element.setAttribute("aria-valuenow", String(Math.round(this.value * 100)));
  }

  reset() {
    this.value = 0;
    this.update(0);
  }
}

const format = {
  ms: (v) => (v === null || v === undefined ? "—" : `${Math.round(v)} ms`),
  kbps: (v) => (v === null || v === undefined ? "—" : `${v.toFixed(1)} kbit/s`),
};

/** Writes a Call snapshot into the statistics grid. */
export function renderStats(s) {
  $("stat-rtt").textContent = format.ms(s.roundTripMs);
  const buffer = $("stat-buffer");
  buffer.textContent = s.handshakeAt === null ? "—" : format.ms(s.bufferedMs);
  buffer.title = s.handshakeAt === null ? "" : `target ${Math.round(s.targetMs)} ms`;
  $("stat-underruns").textContent = s.handshakeAt === null ? "—" : String(s.underruns);
  $("stat-out").textContent = s.handshakeAt === null ? "—" : format.kbps(s.kbpsOut);
  $("stat-in").textContent = s.handshakeAt === null ? "—" : format.kbps(s.kbpsIn);
  $("stat-audio").textContent =
    s.handshakeAt === null ? "—" : `${(s.samplesSent / 24000).toFixed(1)} / ${(s.playedSamples / 24000).toFixed(1)} s`;
}

export function clearStats() {
  for (const id of ["stat-rtt", "stat-buffer", "stat-underruns", "stat-out", "stat-in", "stat-audio"]) $(id).textContent = "—";
}

/** The live transcript: one block per call, text pieces appended as they arrive. */
export class TranscriptView {
  constructor(element) {
    this.element = element;
    this.current = null;
  }

  beginCall(startedAt) {
    const placeholder = $("transcript-placeholder");
    if (placeholder) placeholder.remove();
    const block = document.createElement("article");
    block.className = "turn";
    const head = document.createElement("h3");
    head.textContent = `Call at ${startedAt.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
    this.current = document.createElement("p");
    block.append(head, this.current);
    this.element.append(block);
  }

  append(piece) {
    if (this.current === null) return;
    const atBottom = this.element.scrollHeight - this.element.scrollTop - this.element.clientHeight < 40;
    const text = this.current.textContent === "" ? piece.trimStart() : piece;
    if (text !== "") this.current.append(document.createTextNode(text));
    if (atBottom) this.element.scrollTop = this.element.scrollHeight;
  }

  note(text) {
    if (this.current === null) return;
    const line = document.createElement("p");
    line.className = "turn-note";
    line.textContent = text;
    this.current.after(line);
  }
}

/** Builds the sampling fields; `defaults` are the server's values (shown as placeholders). */
export function buildSettingsFields(container, stored, defaults, adapters = []) {
  container.replaceChildren();
  if (adapters.length > 0) container.append(adapterField(adapters, stored.adapter));
  for (const param of SAMPLING_PARAMS) {
    const wrapper = document.createElement("div");
    wrapper.className = "field";
    const label = document.createElement("label");
    label.htmlFor = `param-${param.name}`;
    label.textContent = param.label;
    const input = document.createElement("input");
    input.type = "number";
    input.id = `param-${param.name}`;
    input.name = param.name;
    input.min = String(param.min);
    input.max = String(param.max);
    input.step = String(param.step);
    input.inputMode = param.kind === "int" ? "numeric" : "decimal";
    const fallback = defaults[param.name];
    input.placeholder = fallback === undefined || fallback === null ? (param.name.endsWith("seed") ? "random" : "server default") : String(fallback);
    input.value = stored[param.name] ?? "";
    wrapper.append(label, input);
    container.append(wrapper);
  }
}

/** The server's LoRA adapters (from /api/info) as a choice; "" is the base model. */
function adapterField(adapters, stored) {
  const wrapper = document.createElement("div");
  wrapper.className = "field";
  const label = document.createElement("label");
  label.htmlFor = "param-adapter";
  label.textContent = "Adapter";
  const select = document.createElement("select");
  select.id = "param-adapter";
  select.name = "adapter";
  for (const [value, text] of [["", "Base model"], ...adapters.map((name) => [name, name])]) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.append(option);
  }
  select.value = adapters.includes(stored) ? stored : "";
  wrapper.append(label, select);
  return wrapper;
}

export function readSettings(form) {
  const values = {};
  for (const param of SAMPLING_PARAMS) values[param.name] = form.elements[param.name].value.trim();
  if (form.elements.adapter) values.adapter = form.elements.adapter.value;
  return values;
}

/** Offer a Blob as a file download. */
export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** "mm:ss" of a duration in seconds. */
export function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}
