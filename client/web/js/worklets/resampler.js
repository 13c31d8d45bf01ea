// Streaming sample-rate converter (windowed-sinc, table driven), allocation-free after construction.
// Used inside the AudioWorklets (push mode for the mic, pull mode for playback) and by the tests.

const PHASES = 256; // fractional positions tabulated per input sample
const ZERO_CROSSINGS = 8; // kernel half-width, in zero crossings of the low-pass sinc

function blackman(x) {
  // x in [-1, 1]
  return 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
}

function buildKernel(cutoff, halfWidth) {
  // table[phase * taps + j]: weight of input sample k = floor(t) - halfWidth + 1 + j for t = floor(t) + phase / PHASES
  const taps = 2 * halfWidth;
  const table = new Float32Array((PHASES + 1) * taps);
  for (let phase = 0; phase <= PHASES; phase++) {
    const frac = phase / PHASES;
    let sum = 0;
    for (let j = 0; j < taps; j++) {
      const d = frac + halfWidth - 1 - j; // t - k
      const x = cutoff * d;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
      const w = Math.abs(d) >= halfWidth ? 0 : blackman(d / halfWidth);
      table[phase * taps + j] = sinc * w;
      sum += sinc * w;
    }
    for (let j = 0; j < taps; j++) table[phase * taps + j] /= sum; // unity gain at DC
  }
  return table;
}

export class StreamResampler {
  /** `maxInput`: largest block given to process()/pulled at once; `maxOutput`: largest block asked for. */
  constructor(inRate, outRate, maxInput = 4096, maxOutput = 4096) {
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate; // input samples per output sample
    const cutoff = Math.min(1, outRate / inRate) * 0.95;
    this.halfWidth = Math.ceil(ZERO_CROSSINGS / cutoff);
    this.taps = 2 * this.halfWidth;
    this.kernel = buildKernel(cutoff, this.halfWidth);
    const capacity = maxInput + Math.ceil(maxOutput * this.step) + 2 * this.taps + 8;
    this.buffer = new Float32Array(capacity);
    this.output = new Float32Array(Math.max(maxOutput, Math.ceil(maxInput / this.step) + 2));
    this.reset();
  }

  /** Forget all history: the next sample starts a fresh stream (output delayed by `halfWidth` input samples). */
  reset() {
    this.buffer.fill(0);
    this.length = this.halfWidth; // primed with zeros (the past before the stream started)
    this.position = this.halfWidth; // read position t relative to buffer[0]: the first output is input sample 0
  }

  /** Push mode: returns a view of the resampled block (valid until the next call). */
  process(input) {
    this.#append(input);
    return this.output.subarray(0, this.#produce(this.output.length));
  }

  /**
   * Pull mode: fill `out` entirely, taking input from `pull(dest)`, which must fill `dest` (a Float32Array view)
   * and may be called with a zero-length view.
   */
  render(out, pull) {
    // one spare sample covers float drift between this estimate and the stepping in #produce
    const needed = Math.floor(this.position + (out.length - 1) * this.step) + this.halfWidth + 2 - this.length;
    if (needed > 0) {
      this.#makeRoom(needed);
      pull(this.buffer.subarray(this.length, this.length + needed));
      this.length += needed;
    }
    const produced = this.#produce(out.length);
    out.set(this.output.subarray(0, produced));
    if (produced < out.length) out.fill(0, produced);
  }

  #append(input) {
    this.#makeRoom(input.length);
    this.buffer.set(input, this.length);
    this.length += input.length;
  }

  #makeRoom(count) {
    if (this.length + count <= this.buffer.length) return;
    const keepFrom = Math.max(0, Math.floor(this.position) - this.halfWidth + 1);
    this.buffer.copyWithin(0, keepFrom, this.length);
    this.length -= keepFrom;
    this.position -= keepFrom;
    if (this.length + count > this.buffer.length) throw new RangeError("resampler block larger than its capacity");
  }

  #produce(maxCount) {
    const { buffer, kernel, taps, halfWidth, step } = this;
    let t = this.position;
    let n = 0;
    while (n < maxCount && Math.floor(t) + halfWidth < this.length) {
      const base = Math.floor(t);
      const phase = Math.round((t - base) * PHASES);
      const row = phase * taps;
      const first = base - halfWidth + 1;
      let acc = 0;
      for (let j = 0; j < taps; j++) acc += buffer[first + j] * kernel[row + j];
      this.output[n++] = acc;
      t += step;
    }
    this.position = t;
    return n;
  }
}

/** Same rates: a resampler-shaped pass-through, so callers need no special case. */
export class PassThrough {
  constructor() {
    this.output = null;
  }

  process(input) {
    return input;
  }

  render(out, pull) {
    pull(out);
  }

  reset() {}
}

export function makeResampler(inRate, outRate, maxInput, maxOutput) {
  return inRate === outRate ? new PassThrough() : new StreamResampler(inRate, outRate, maxInput, maxOutput);
}
