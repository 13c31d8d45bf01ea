// Adaptive jitter buffer for the model's audio: a ring of samples that starts playing once `target` is buffered,
// counts underruns, raises the target after each underrun and lowers it again after a calm stretch.

export const JITTER_DEFAULTS = {
  sampleRate: 24000,
  capacitySeconds: 10,
  startMs: 120, // initial target: play once this much is buffered
  minMs: 80,
  maxMs: 480,
  growMs: 40, // added to the target after every underrun
  shrinkMs: 20, // removed from the target after `calmSeconds` without an underrun
  calmSeconds: 10,
  overflowMs: 400, // buffered beyond target + this is dropped (caps the added latency)
};

export class JitterBuffer {
  constructor(options = {}) {
    const o = { ...JITTER_DEFAULTS, ...options };
    this.options = o;
    this.msToSamples = (ms) => Math.round((ms * o.sampleRate) / 1000);
    this.ring = new Float32Array(Math.round(o.capacitySeconds * o.sampleRate));
    this.reset();
  }

  reset() {
    const o = this.options;
    this.readAt = 0;
    this.writeAt = 0;
    this.buffered = 0;
    this.playing = false;
    this.targetSamples = this.msToSamples(o.startMs);
    this.underruns = 0;
    this.droppedSamples = 0;
    this.playedSamples = 0; // real samples handed to the output
    this.silentSamples = 0; // zeros handed out while buffering
    this.receivedSamples = 0;
    this.calmSamples = 0;
  }

  get bufferedMs() {
    return (this.buffered * 1000) / this.options.sampleRate;
  }

  get targetMs() {
    return (this.targetSamples * 1000) / this.options.sampleRate;
  }

  push(samples) {
    this.receivedSamples += samples.length;
    for (let i = 0; i < samples.length; i++) {
      this.ring[this.writeAt] = samples[i];
      this.writeAt = (this.writeAt + 1) % this.ring.length;
    }
    this.buffered += samples.length;
    const limit = Math.min(this.ring.length, this.targetSamples + this.msToSamples(this.options.overflowMs));
    if (this.buffered > limit) this.#drop(this.buffered - this.targetSamples);
    if (!this.playing && this.buffered >= this.targetSamples) this.playing = true;
  }

  /** Fill `out` with buffered audio (zeros while buffering); returns how many real samples were written. */
  pull(out) {
    if (!this.playing) {
      out.fill(0);
      this.silentSamples += out.length;
      return 0;
    }
    const take = Math.min(out.length, this.buffered);
    for (let i = 0; i < take; i++) {
      out[i] = this.ring[this.readAt];
      this.readAt = (this.readAt + 1) % this.ring.length;
    }
    this.buffered -= take;
    this.playedSamples += take;
    if (take < out.length) {
      out.fill(0, take);
      this.silentSamples += out.length - take;
      this.#underrun();
    } else {
      this.#calm(take);
    }
    return take;
  }

  #underrun() {
    const o = this.options;
    this.underruns++;
    this.playing = false;
    this.calmSamples = 0;
    this.targetSamples = Math.min(this.msToSamples(o.maxMs), this.targetSamples + this.msToSamples(o.growMs));
  }

  #calm(count) {
    const o = this.options;
    this.calmSamples += count;
    if (this.calmSamples < o.calmSeconds * o.sampleRate) return;
    this.calmSamples = 0;
    this.targetSamples = Math.max(this.msToSamples(o.minMs), this.targetSamples - this.msToSamples(o.shrinkMs));
  }

  #drop(count) {
    this.readAt = (this.readAt + count) % this.ring.length;
    this.buffered -= count;
    this.droppedSamples += count;
  }

  snapshot() {
    return {
      bufferedMs: this.bufferedMs,
      targetMs: this.targetMs,
      underruns: this.underruns,
      playing: this.playing,
      playedSamples: this.playedSamples,
      silentSamples: this.silentSamples,
      droppedSamples: this.droppedSamples,
      receivedSamples: this.receivedSamples,
    };
  }
}
