// Call statistics computed on the main thread: round-trip estimate and bitrates.

/**
 * Round-trip estimate from the audio clocks: the server answers every 80 ms of user audio with 80 ms of model
 * audio, so the model audio that brings the received total to R seconds answers the user audio that brought the
 * sent total to R. The time between those two moments is the round trip (network + queues + model step + the
 * model's fixed acoustic delay).
 */
export class RoundTripEstimator {
  constructor(smoothing = 0.2) {
    this.smoothing = smoothing;
    this.sent = []; // [cumulative seconds sent, time] pairs, oldest first
    this.sentSeconds = 0;
    this.receivedSeconds = 0;
    this.latest = null;
    this.smoothed = null;
  }

  noteSent(seconds, now) {
    this.sentSeconds += seconds;
    this.sent.push([this.sentSeconds, now]);
  }

  noteReceived(seconds, now) {
    this.receivedSeconds += seconds;
    while (this.sent.length > 0 && this.sent[0][0] < this.receivedSeconds - 1e-6) this.sent.shift();
    if (this.sent.length === 0) return; // more audio back than sent: nothing to pair it with
    this.latest = now - this.sent[0][1];
    this.smoothed = this.smoothed === null ? this.latest : this.smoothed + this.smoothing * (this.latest - this.smoothed);
  }
}

/** Bits per second over a sliding window (default 2 s), from a growing byte counter. */
export class BitrateMeter {
  constructor(windowMs = 2000) {
    this.windowMs = windowMs;
    this.bytes = 0;
    this.samples = []; // [time, bytes] pairs inside the window
    this.bitsPerSecond = 0;
  }

  add(count) {
    this.bytes += count;
  }

  sample(now) {
    this.samples.push([now, this.bytes]);
    while (this.samples.length > 2 && now - this.samples[1][0] >= this.windowMs) this.samples.shift();
    const [firstTime, firstBytes] = this.samples[0];
    if (now > firstTime) this.bitsPerSecond = ((this.bytes - firstBytes) * 8 * 1000) / (now - firstTime);
    return this.bitsPerSecond;
  }
}
