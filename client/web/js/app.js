// Page controller: wires the call button, settings, transcript, meters, statistics and downloads.

import { Call } from "./call.js";
import { chatUrl, samplingQuery } from "./protocol.js";
import {
  LevelMeter, TranscriptView, buildSettingsFields, clearStats, clock, download, readSettings, renderStats,
} from "./ui.js";

const STORAGE_KEY = "duplex.sampling";
const ACTIVE_STATES = new Set(["starting", "connecting", "waiting", "live"]);
const LIVE_HINT = "Speak naturally — the model listens while it talks. Headphones keep it from hearing itself.";
const $ = (id) => document.getElementById(id);

const page = {
  call: null,
  lastCall: null,
  serverDefaults: {},
  serverAdapters: [],  // the LoRA adapters of the server (/api/info), chosen in Settings
  meters: null,
  transcript: null,
  timer: null,
  apiKey: "",
};

function loadStoredSettings() {
  try {
    return JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}");
  } catch {
    return {};
  }
}

function storeSettings(values) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(values));
  } catch {
    /* private mode: settings just do not persist */
  }
}

/** Server defaults for the sampling fields, from whatever shape /api/info gives them in. */
function defaultsFromInfo(info) {
  const source = info.defaults || info.sampling || info.lm_gen_config || {};
  const aliases = { text_temperature: "temp_text", text_topk: "top_k_text", audio_temperature: "temp", audio_topk: "top_k" };
  const defaults = {};
  for (const [name, alias] of Object.entries(aliases)) {
    const value = source[name] ?? source[alias];
    if (value !== undefined) defaults[name] = value;
  }
  return defaults;
}

function describeInfo(info) {
  const name = info.model || info.model_name || info.name || "duplex";
  const rate = info.sample_rate ? ` · ${(info.sample_rate / 1000).toFixed(0)} kHz` : "";
  const device = info.device ? ` · ${info.device}` : "";
  return `${name}${rate}${device}`;
}

// An API key (servers started with --api-key) lives for this browser tab only: sessionStorage, never
// localStorage or a cookie. It goes to the API as a Bearer header and to the websocket as ?api_key=.
const KEY_STORAGE = "duplex-api-key";

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return page.apiKey || "";
  }
}

function storeKey(key) {
  page.apiKey = key;
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key stays in memory for this page
  }
}

function askForKey(wrong) {
  const form = $("key-form");
  form.hidden = false;
  $("key-error").textContent = wrong ? "That key was refused; try again." : "";
  $("key-input").focus();
}

function setUpKeyForm() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    storeKey(key);
    $("key-input").value = "";
    $("key-form").hidden = true;
    loadServerInfo(true);
  });
}

async function loadServerInfo(afterKey = false) {
  try {
    const key = storedKey();
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    const response = await fetch("api/info", { cache: "no-store", headers });
    if (response.status === 401) {
      storeKey("");
      $("model-info").textContent = "This server needs an API key";
      askForKey(afterKey || Boolean(key));
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    if (info.demo) {
      $("demo-notice").hidden = false;
    }
    page.serverDefaults = defaultsFromInfo(info);
    page.serverAdapters = Array.isArray(info.adapters) ? info.adapters.map(String) : [];
    if (info.defaults && info.defaults.use_sampling === false) {
      $("settings-mode").textContent = "This server decodes greedily by default; setting a temperature or top-k turns sampling on for your call.";
    }
    $("model-info").textContent = describeInfo(info);
    window.duplexServerInfo = info;
  } catch {
    $("model-info").textContent = "Model information unavailable";
  }
  buildSettingsFields($("settings-fields"), loadStoredSettings(), page.serverDefaults, page.serverAdapters);
}

function setMessage(text, tone = "info") {
  const message = $("message");
  message.textContent = text;
  message.dataset.tone = tone;
}

function setMuted(muted) {
  const button = $("mute-button");
  button.setAttribute("aria-pressed", String(muted));
  $("mute-label").textContent = muted ? "Muted" : "Mute";
  if (page.call) page.call.setMuted(muted);
}

function setStatus(state, text) {
  $("status-dot").dataset.state = state;
  $("status-text").textContent = text;
  const button = $("call-button");
  const active = ACTIVE_STATES.has(state);
  $("mute-button").disabled = !active;
  button.dataset.state = active ? "active" : "idle";
  $("call-label").textContent = active ? "End call" : "Start call";
  document.body.dataset.callState = state;
}

/** Metadata (kind 4): queue position, session details, settings the server ignored. */
function showMetadata(data) {
  window.duplexMetadata = [...(window.duplexMetadata || []), data];
  if (data.type === "queue" || typeof data.queue_position === "number") {
    const position = data.queue_position;
    if (page.call && page.call.state !== "live") {
      setStatus("waiting", `All slots are busy — you are number ${position} in the queue`);
    }
    return;
  }
  if (data.type !== "session") return;
  const ignored = [...(data.unsupported_params || []), ...(data.ignored_params || [])];
  if (ignored.length > 0) setMessage(`The server ignored these settings: ${ignored.join(", ")}.`, "warn");
  const parts = [`Session ${String(data.session_id || "").slice(0, 8)}`];
  if (data.sampling) {
    const s = data.sampling;
    parts.push(`text: ${describeStream(s.text_sampling, s.temp_text, s.top_k_text, s.text_seed)}`);
    parts.push(`audio: ${describeStream(s.audio_sampling, s.temp, s.top_k, s.audio_seed)}`);
  }
  if (typeof data.max_session_seconds === "number") parts.push(`limit ${clock(data.max_session_seconds)}`);
  $("session-info").textContent = parts.join(" · ");
}

/** One stream's sampling as the session metadata reports it, e.g. "T=0.7, k=25, seed 42" or "greedy". */
function describeStream(sampling, temperature, topK, seed) {
  return sampling ? `T=${temperature}, k=${topK}, seed ${seed}` : "greedy";
}

function onStats(snapshot) {
  window.duplexStats = snapshot;
  renderStats(snapshot);
  if (snapshot.handshakeAt !== null && ACTIVE_STATES.has(snapshot.state)) $("timer").textContent = clock(snapshot.secondsLive);
}

function onLevel({ side, rms }) {
  if (side === "user") page.meters.user.update(rms);
  else page.meters.model.update(rms);
}

function onEnded({ reason, message }) {
  setStatus(reason === "error" ? "error" : "idle", reason === "error" ? "Call failed" : "Call ended");
  if (reason !== "error") setMessage(message, "info");
  page.meters.user.reset();
  page.meters.model.reset();
  setMuted(false);
  const call = page.call;
  page.lastCall = call;
  page.call = null;
  $("download-audio").disabled = call.recorder.seconds <= 0;
  $("download-transcript").disabled = call.counters.handshakeAt === null;
  $("call-button").focus();
}

function startCall() {
  let query;
  try {
    query = samplingQuery(readSettings($("settings-form")));
  } catch (error) {
    setMessage(`${error.message} — fix it in Settings.`, "error");
    return;
  }
  setMessage("");
  clearStats();
  $("timer").textContent = "00:00";
  const key = storedKey();
  if (key) query.set("api_key", key);
  const call = new Call(chatUrl(window.location, query));
  page.call = call;
  window.duplexCall = call;
  setMuted(false);
  call
    .on("state", (state, detail) => {
      if (state === "live") {
        page.transcript.beginCall(new Date());
        if ($("message").textContent === "") setMessage(LIVE_HINT);
      }
      if (state !== "ended") setStatus(state, detail);
    })
    .on("text", (piece) => page.transcript.append(piece))
    .on("metadata", showMetadata)
    .on("error", (message) => setMessage(message, "error"))
    .on("level", onLevel)
    .on("stats", onStats)
    .on("ended", onEnded);
  call.start();
}

function onCallButton() {
  if (page.call && ACTIVE_STATES.has(page.call.state)) page.call.stop();
  else startCall();
}

function timestampName(extension) {
  const stamp = new Date().toISOString().replace(/[:]/g, "-").replace(/\..+$/, "");
  return `duplex-${stamp}.${extension}`;
}

function downloadTranscript() {
  const call = page.lastCall;
  if (!call) return;
  const when = new Date(performance.timeOrigin + call.counters.startedAt).toISOString();
  const text = `duplex conversation, ${when}\nmodel: ${$("model-info").textContent}\n\n${call.transcript.trim()}\n`;
  download(new Blob([text], { type: "text/plain;charset=utf-8" }), timestampName("txt"));
}

function setupSettings() {
  const dialog = $("settings");
  $("settings-button").addEventListener("click", () => dialog.showModal());
  $("settings-form").addEventListener("submit", (event) => {
    try {
      samplingQuery(readSettings(event.target));
      $("settings-error").textContent = "";
      storeSettings(readSettings(event.target));
    } catch (error) {
      event.preventDefault();
      $("settings-error").textContent = error.message;
    }
  });
  $("settings-reset").addEventListener("click", () => {
    storeSettings({});
    buildSettingsFields($("settings-fields"), {}, page.serverDefaults, page.serverAdapters);
    $("settings-error").textContent = "";
  });
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // click on the backdrop
  });
}

function main() {
  page.meters = { user: new LevelMeter($("mic-meter")), model: new LevelMeter($("model-meter")) };
  page.transcript = new TranscriptView($("transcript"));
  $("call-button").addEventListener("click", onCallButton);
  $("mute-button").addEventListener("click", () => setMuted($("mute-button").getAttribute("aria-pressed") !== "true"));
  $("download-audio").addEventListener("click", () => page.lastCall && download(page.lastCall.recorder.toWav(), timestampName("wav")));
  $("download-transcript").addEventListener("click", downloadTranscript);
  setupSettings();
  setUpKeyForm();
  if (!window.isSecureContext) {
    setMessage("This page is not a secure context, so the browser will not open the microphone. Use https (duplex serve --ssl DIR) or localhost.", "warn");
  }
  loadServerInfo().then(() => {
    document.body.dataset.ready = "true";
  });
}

main();
