// One call: microphone -> Opus/Ogg -> websocket -> Opus/Ogg -> jitter-buffered playback, plus transcript and stats.

import { OggOpusDecoder, OggOpusEncoder, SAMPLE_RATE, webCodecsOpusSupported } from "./opus.js";
import { Kind, decodeMessage, encodeMessage } from "./protocol.js";
import { ConversationRecorder } from "./recorder.js";
import { BitrateMeter, RoundTripEstimator } from "./stats.js";
import { makeResampler } from "./worklets/resampler.js";

const MIC_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  video: false,
};
const WORKLETS = ["js/worklets/capture.js", "js/worklets/playback.js"];
const STATS_INTERVAL_MS = 250;

/** A failure meant for the person using the page (shown as is). */
export class CallError extends Error {}

function describeMicError(error) {
  if (!window.isSecureContext) return "The microphone needs a secure page: open it over https (duplex serve --ssl DIR) or on localhost.";
  if (error && error.name === "NotAllowedError") return "Microphone access was denied. Allow it in the browser and try again.";
  if (error && error.name === "NotFoundError") return "No microphone was found.";
  return `The microphone could not be opened: ${error && error.message ? error.message : error}`;
}

/**
 * Events (via `on(name, handler)`): state(name, detail), text(piece), metadata(object), error(message),
 * level({side, rms, peak}), stats(object), ended({reason}).
 */
export class Call {
  constructor(url) {
    this.url = url;
    this.handlers = {};
    this.state = "idle";
    this.recorder = new ConversationRecorder();
    this.transcript = "";
    this.rtt = new RoundTripEstimator();
    this.bitrateOut = new BitrateMeter();
    this.bitrateIn = new BitrateMeter();
    this.counters = {
      messagesIn: 0, audioPagesOut: 0, audioMessagesIn: 0, textPieces: 0, samplesSent: 0, samplesDecoded: 0,
      startedAt: null, handshakeAt: null,
    };
    this.playback = { bufferedMs: 0, targetMs: 0, underruns: 0, playedSamples: 0, droppedSamples: 0, playing: false };
    this.endedByUser = false;
    this.failed = false;
    this.muted = false;
  }

  on(name, handler) {
    this.handlers[name] = handler;
    return this;
  }

  #emit(name, ...args) {
    if (this.handlers[name]) this.handlers[name](...args);
  }

  #setState(state, detail = "") {
    this.state = state;
    this.#emit("state", state, detail);
  }

  /** Open audio, microphone and websocket; call from a click handler (browsers need the gesture for audio). */
  async start() {
    this.#setState("starting", "Opening the microphone…");
    this.counters.startedAt = performance.now();
    try {
      if (!window.isSecureContext) throw new CallError(describeMicError(null));
      this.context = new AudioContext({ latencyHint: "interactive" });
      await this.context.resume();
      if (!(await webCodecsOpusSupported())) {
        throw new CallError("This browser cannot encode Opus audio (WebCodecs). Use a recent Chrome, Edge or Firefox.");
      }
      await Promise.all(WORKLETS.map((path) => this.context.audioWorklet.addModule(path)));
      this.stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS).catch((error) => {
        throw new CallError(describeMicError(error));
      });
      if (this.state === "ended") return this.#release();
      this.#buildAudioGraph();
      this.#openSocket();
    } catch (error) {
      this.#fail(error instanceof CallError ? error.message : `Could not start the call: ${error.message || error}`);
    }
  }

  /** Hang up (user action). */
  stop() {
    if (this.state === "ended") return;
    this.endedByUser = true;
    this.#end("You ended the call.");
  }

  #buildAudioGraph() {
    const ctx = this.context;
    this.source = ctx.createMediaStreamSource(this.stream);
    this.captureNode = new AudioWorkletNode(ctx, "duplex-capture", { numberOfInputs: 1, numberOfOutputs: 1 });
    this.captureNode.port.onmessage = (event) => this.#onMicBlock(event.data);
    this.source.connect(this.captureNode);
    this.captureNode.connect(ctx.destination); // silent output: keeps the node pulled by the graph
    this.playbackNode = new AudioWorkletNode(ctx, "duplex-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
    });
    this.playbackNode.port.onmessage = (event) => this.#onPlaybackMessage(event.data);
    this.playbackNode.connect(ctx.destination);
  }

  #openSocket() {
    this.#setState("connecting", "Connecting to the server…");
    this.socket = new WebSocket(this.url);
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.#onMessage(event.data);
    this.socket.onclose = (event) => this.#onClose(event);
    this.socket.onerror = () => {}; // the close event that follows carries what we can know
    this.statsTimer = setInterval(() => this.#publishStats(), STATS_INTERVAL_MS);
  }

  #onMessage(data) {
    if (typeof data === "string") return; // the protocol is binary only
    this.counters.messagesIn++;
    this.bitrateIn.add(data.byteLength);
    const message = decodeMessage(data);
    switch (message.kind) {
      case Kind.HANDSHAKE:
        return this.#onHandshake(message);
      case Kind.AUDIO:
        return this.#onAudio(message.bytes);
      case Kind.TEXT:
        this.counters.textPieces++;
        this.transcript += message.text;
        return this.#emit("text", message.text);
      case Kind.METADATA:
        return this.#emit("metadata", message.data);
      case Kind.ERROR:
        return this.#fail(message.text || "The server reported an error.");
      default:
        return undefined; // control, ping and unknown kinds are ignored
    }
  }

  #onHandshake(message) {
    if (this.state === "live") return;
    this.counters.handshakeAt = performance.now();
    this.protocolVersion = message.protocolVersion;
    this.encoder = new OggOpusEncoder(
      (page) => this.#sendAudio(page),
      (error) => this.#fail(`Audio encoder failed: ${error.message}`),
    );
    this.decoder = new OggOpusDecoder(
      (samples, rate) => this.#onDecoded(samples, rate),
      (error) => this.#fail(`Audio decoder failed: ${error.message}`),
    );
    for (const page of this.encoder.headerPages()) this.#sendAudio(page, false);
    this.#setState("live", "Connected — start talking.");
  }

  #sendAudio(page, isAudio = true) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return;
    const message = encodeMessage(Kind.AUDIO, page);
    this.socket.send(message);
    this.bitrateOut.add(message.length);
    if (isAudio) this.counters.audioPagesOut++;
  }

  /** Muted: the call goes on, with silence sent in place of the microphone (the server expects a steady stream). */
  setMuted(muted) {
    this.muted = Boolean(muted);
  }

  #onMicBlock({ samples, position, rms, peak }) {
    if (this.muted) samples.fill(0);
    this.#emit("level", { side: "user", rms: this.muted ? 0 : rms, peak: this.muted ? 0 : peak });
    if (this.state !== "live") return;
    this.recorder.addUser(position, samples);
    this.encoder.encode(samples);
    this.counters.samplesSent += samples.length;
    this.rtt.noteSent(samples.length / SAMPLE_RATE, performance.now());
  }

  #onAudio(bytes) {
    if (!this.decoder) return;
    this.counters.audioMessagesIn++;
    const samples48k = this.decoder.push(bytes);
    if (samples48k > 0) this.rtt.noteReceived(samples48k / 48000, performance.now());
  }

  #onDecoded(samples, rate) {
    let pcm = samples;
    if (rate !== SAMPLE_RATE) {
      if (!this.decodeResampler || this.decodeResampler.inRate !== rate) {
        this.decodeResampler = makeResampler(rate, SAMPLE_RATE, 8192, 8192);
        this.decodeResampler.inRate = rate;
      }
      pcm = this.decodeResampler.process(samples).slice();
    }
    this.counters.samplesDecoded += pcm.length;
    if (this.playbackNode) this.playbackNode.port.postMessage({ type: "audio", samples: pcm }, [pcm.buffer]);
  }

  #onPlaybackMessage(message) {
    if (message.type === "played") {
      if (this.state === "live") this.recorder.addModel(message.position, message.samples);
    } else if (message.type === "stats") {
      this.playback = message;
      this.#emit("level", { side: "model", rms: message.rms, peak: message.peak });
    }
  }

  #onClose(event) {
    if (this.state === "ended") return;
    if (this.failed) return this.#end();
    const reason = event.reason ? `: ${event.reason}` : "";
    if (this.counters.handshakeAt === null) {
      this.#fail(`Could not connect to the server (code ${event.code}${reason}).`);
    } else {
      this.#end(`The server ended the call (code ${event.code}${reason}).`);
    }
  }

  #fail(message) {
    if (this.state === "ended" || this.failed) return;
    this.failed = true;
    this.#emit("error", message);
    this.#end(message, "error");
  }

  #end(message = "", reason = "ended") {
    if (this.state === "ended") return;
    this.#setState("ended", message);
    this.#release();
    this.#publishStats();
    this.#emit("ended", { reason, message });
  }

  #release() {
    clearInterval(this.statsTimer);
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000, "client hung up");
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    if (this.encoder) this.encoder.close();
    if (this.decoder) this.decoder.close();
    if (this.captureNode) this.captureNode.port.onmessage = null;
    if (this.context && this.context.state !== "closed") this.context.close();
  }

  /** Everything the page shows (and tests read) about this call. */
  snapshot() {
    const now = performance.now();
    return {
      state: this.state,
      muted: this.muted,
      ...this.counters,
      secondsLive: this.counters.handshakeAt === null ? 0 : (now - this.counters.handshakeAt) / 1000,
      bytesOut: this.bitrateOut.bytes,
      bytesIn: this.bitrateIn.bytes,
      kbpsOut: this.bitrateOut.bitsPerSecond / 1000,
      kbpsIn: this.bitrateIn.bitsPerSecond / 1000,
      roundTripMs: this.rtt.smoothed,
      packetsDecoded: this.decoder ? this.decoder.packetsIn : 0,
      crcErrors: this.decoder ? this.decoder.reader.crcErrors : 0,
      bufferedMs: this.playback.bufferedMs,
      targetMs: this.playback.targetMs,
      underruns: this.playback.underruns,
      playedSamples: this.playback.playedSamples,
      droppedSamples: this.playback.droppedSamples,
      transcriptChars: this.transcript.length,
      recordedSeconds: this.recorder.seconds,
      contextRate: this.context ? this.context.sampleRate : null,
    };
  }

  #publishStats() {
    const now = performance.now();
    this.bitrateIn.sample(now);
    this.bitrateOut.sample(now);
    this.#emit("stats", this.snapshot());
  }
}
