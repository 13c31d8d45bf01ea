// AudioWorklet: plays the model's 24 kHz audio through the adaptive jitter buffer, resampled to the context rate.
// Messages in:  {type: "audio", samples: Float32Array (24 kHz)} | {type: "reset"}
// Messages out: {type: "played", samples, position} (what was heard, 24 kHz timeline) and
//               {type: "stats", ...JitterBuffer.snapshot(), peak, rms} about 10 times a second.
import { JitterBuffer } from "./jitter.js";
import { makeResampler } from "./resampler.js";

const SOURCE_RATE = 24000;
const REPORT_BLOCK = 1200; // 50 ms of 24 kHz audio per "played" message

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.jitter = new JitterBuffer({ sampleRate: SOURCE_RATE, ...(options.processorOptions || {}) });
    this.resampler = makeResampler(SOURCE_RATE, sampleRate, 1024, 1024);
    this.played = new Float32Array(REPORT_BLOCK);
    this.playedFill = 0;
    this.position = -1;
    this.peak = 0;
    this.sumSquares = 0;
    this.levelCount = 0;
    this.framesSinceReport = 0;
    this.pull = (dest) => this.#pull(dest);
    this.port.onmessage = (event) => this.#onMessage(event.data);
  }

  #onMessage(message) {
    if (message.type === "audio") this.jitter.push(message.samples);
    else if (message.type === "reset") this.jitter.reset();
  }

  #pull(dest) {
    this.jitter.pull(dest);
    for (let i = 0; i < dest.length; i++) {
      const value = dest[i];
      const magnitude = Math.abs(value);
      if (magnitude > this.peak) this.peak = magnitude;
      this.sumSquares += value * value;
      this.played[this.playedFill++] = value;
      if (this.playedFill === REPORT_BLOCK) this.#flushPlayed();
    }
    this.levelCount += dest.length;
  }

  #flushPlayed() {
    const samples = this.played;
    this.port.postMessage({ type: "played", samples, position: this.position }, [samples.buffer]);
    this.position += REPORT_BLOCK;
    this.played = new Float32Array(REPORT_BLOCK);
    this.playedFill = 0;
  }

  process(inputs, outputs) {
    if (this.position < 0) this.position = Math.round((currentFrame * SOURCE_RATE) / sampleRate);
    const output = outputs[0];
    this.resampler.render(output[0], this.pull);
    for (let c = 1; c < output.length; c++) output[c].set(output[0]);
    this.framesSinceReport += output[0].length;
    if (this.framesSinceReport >= sampleRate / 10) this.#report();
    return true;
  }

  #report() {
    const rms = this.levelCount > 0 ? Math.sqrt(this.sumSquares / this.levelCount) : 0;
    this.port.postMessage({ type: "stats", ...this.jitter.snapshot(), peak: this.peak, rms });
    this.framesSinceReport = 0;
    this.peak = 0;
    this.sumSquares = 0;
    this.levelCount = 0;
  }
}

registerProcessor("duplex-playback", PlaybackProcessor);
