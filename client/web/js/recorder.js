// Conversation recorder: both sides on one 24 kHz timeline (left = user mic, right = model as played),
// written out as a 16-bit stereo WAV.

const SAMPLE_RATE = 24000;
const MAX_SECONDS = 30 * 60; // 2 × 86 MB of 16-bit samples at most; later audio is not recorded

class Track {
  constructor() {
    this.data = new Int16Array(SAMPLE_RATE * 30);
    this.length = 0;
  }

  write(offset, samples) {
    const end = Math.min(offset + samples.length, SAMPLE_RATE * MAX_SECONDS);
    if (offset < 0 || end <= offset) return;
    if (end > this.data.length) {
      const grown = new Int16Array(Math.min(Math.max(end, this.data.length * 2), SAMPLE_RATE * MAX_SECONDS));
      grown.set(this.data.subarray(0, this.length));
      this.data = grown;
    }
    for (let i = 0; i < end - offset; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      this.data[offset + i] = Math.round(s * 32767);
    }
    this.length = Math.max(this.length, end);
  }
}

export class ConversationRecorder {
  constructor() {
    this.user = new Track();
    this.model = new Track();
    this.origin = null; // timeline position of the first recorded user sample
  }

  get seconds() {
    return Math.max(this.user.length, this.model.length) / SAMPLE_RATE;
  }

  /** User audio as sent; `position` is on the worklets' shared 24 kHz timeline. */
  addUser(position, samples) {
    if (this.origin === null) this.origin = position;
    this.user.write(position - this.origin, samples);
  }

  /** Model audio as played (silence included), same timeline. */
  addModel(position, samples) {
    if (this.origin === null) return;
    this.model.write(position - this.origin, samples);
  }

  /** A Blob holding the stereo WAV (left = user, right = model). */
  toWav() {
    const frames = Math.max(this.user.length, this.model.length);
    const header = new DataView(new ArrayBuffer(44));
    const dataBytes = frames * 4;
    const ascii = (at, text) => [...text].forEach((ch, i) => header.setUint8(at + i, ch.charCodeAt(0)));
    ascii(0, "RIFF");
    header.setUint32(4, 36 + dataBytes, true);
    ascii(8, "WAVE");
    ascii(12, "fmt ");
    header.setUint32(16, 16, true);
    header.setUint16(20, 1, true); // PCM
    header.setUint16(22, 2, true); // channels
    header.setUint32(24, SAMPLE_RATE, true);
    header.setUint32(28, SAMPLE_RATE * 4, true); // byte rate
    header.setUint16(32, 4, true); // block align
    header.setUint16(34, 16, true); // bits per sample
    ascii(36, "data");
    header.setUint32(40, dataBytes, true);
    const interleaved = new Int16Array(frames * 2);
    for (let i = 0; i < frames; i++) {
      interleaved[2 * i] = i < this.user.length ? this.user.data[i] : 0;
      interleaved[2 * i + 1] = i < this.model.length ? this.model.data[i] : 0;
    }
    return new Blob([header.buffer, interleaved.buffer], { type: "audio/wav" });
  }
}
