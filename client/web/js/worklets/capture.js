// AudioWorklet: microphone -> 24 kHz mono blocks of 20 ms posted to the main thread, with the input level.
import { makeResampler } from "./resampler.js";

const TARGET_RATE = 24000;
const BLOCK = 480; // 20 ms at 24 kHz: one Opus frame

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = makeResampler(sampleRate, TARGET_RATE, 1024, 1024);
    this.block = new Float32Array(BLOCK);
    this.filled = 0;
    this.position = -1; // 24 kHz timeline position of block[0] (shared clock with the playback worklet)
    this.peak = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (this.position < 0) this.position = Math.round((currentFrame * TARGET_RATE) / sampleRate);
    const mono = channels && channels.length > 0 ? channels[0] : null;
    if (mono === null) return true; // no input connected yet
    const resampled = this.resampler.process(mono);
    for (let i = 0; i < resampled.length; i++) this.#pushSample(resampled[i]);
    return true;
  }

  #pushSample(value) {
    this.block[this.filled++] = value;
    const magnitude = Math.abs(value);
    if (magnitude > this.peak) this.peak = magnitude;
    this.sumSquares += value * value;
    if (this.filled < BLOCK) return;
    const samples = this.block;
    this.port.postMessage(
      { samples, position: this.position, peak: this.peak, rms: Math.sqrt(this.sumSquares / BLOCK) },
      [samples.buffer],
    );
    this.position += BLOCK;
    this.block = new Float32Array(BLOCK);
    this.filled = 0;
    this.peak = 0;
    this.sumSquares = 0;
  }
}

registerProcessor("duplex-capture", CaptureProcessor);
