"""The public Mimi codec: 24 kHz mono audio <-> 12.5 Hz discrete codes, offline and frame by frame.

Offline `encode` / `decode` run the very same streaming path as `encode_step` / `decode_step`, from a fresh
state, in chunks of `offline_chunk_frames` frames (1 by default), so the two cannot disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from duplex.model.transformer import check_ready

from .blocks import ConvDownsample1d, ConvTrUpsample1d, ProjectedTransformer
from .config import MimiConfig
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetDecoder, SeanetEncoder
from .state import DecoderState, EncoderState, MimiState

F = TypeVar("F", bound=Callable[..., Any])


def _inference(method: F) -> F:
    """Run under inference_mode; hand back ordinary tensors to callers outside it (cheap: outputs are small)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode():
            out = method(*args, **kwargs)
        return out.clone() if isinstance(out, Tensor) else out

    return wrapper  # type: ignore[return-value]


def _after_load(module: Mimi, incompatible_keys: Any) -> None:
    """After any load_state_dict: derive the codebook centroids and re-pack conv weights."""
    module.quantizer.refresh_centroids()
    module.pack_()


class Mimi(nn.Module):
    """Mimi as published (SEANet + transformers + split RVQ); module paths match Kyutai's checkpoint keys."""

    def __init__(self, config: MimiConfig | None = None, num_codebooks: int = 8) -> None:
        super().__init__()
        self.config = config or MimiConfig.official()
        dim = self.config.seanet.dimension
        self.encoder = SeanetEncoder(self.config.seanet)
        self.decoder = SeanetDecoder(self.config.seanet)
        self.encoder_transformer = ProjectedTransformer(self.config.transformer)
        self.decoder_transformer = ProjectedTransformer(self.config.transformer)
        self.downsample = ConvDownsample1d(self.config.resample_stride, dim)
        self.upsample = ConvTrUpsample1d(self.config.resample_stride, dim)
        self.quantizer = SplitResidualVectorQuantizer(self.config.quantizer)
        # Frames per call inside encode()/decode(). 1 = literally the encode_step/decode_step computation, so codes
        # are bit-identical to streaming; larger chunks are faster but float rounding may differ in the last bits
        # (audio within ~1e-6, and a near-tie code in a deep codebook may flip).
        self.offline_chunk_frames = 1
        self._num_codebooks = 0
        self.num_codebooks = num_codebooks
        self.register_load_state_dict_post_hook(_after_load)

    # ------------------------------------------------------------------ properties
    @property
    def sample_rate(self) -> int:
        """Audio sample rate (24000)."""
        return self.config.sample_rate

    @property
    def frame_rate(self) -> float:
        """Code frames per second (12.5)."""
        return self.config.frame_rate

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920)."""
        return self.config.frame_size

    @property
    def total_codebooks(self) -> int:
        """Codebooks in the checkpoint (32 for the published one)."""
        return self.config.quantizer.n_q

    @property
    def cardinality(self) -> int:
        """Entries per codebook (2048 for the published one)."""
        return self.config.quantizer.bins

    @property
    def num_codebooks(self) -> int:
        """Codebooks used by encode / encode_step (settable, 1..total_codebooks)."""
        return self._num_codebooks

    @num_codebooks.setter
    def num_codebooks(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.total_codebooks:
            raise ValueError(f"num_codebooks must be an int in 1..{self.total_codebooks}, got {value!r}")
        self._num_codebooks = value

    @classmethod
    def from_pretrained(
        cls,
        weights: str | Path | dict[str, Tensor],
        config: MimiConfig | dict | str | Path | None = None,
        num_codebooks: int = 8,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Mimi:
        """Load Kyutai's Mimi safetensors (official key names) strictly; see `duplex.codec.loading`."""
        from .loading import load_mimi

        return load_mimi(weights, config=config, num_codebooks=num_codebooks, device=device, dtype=dtype)

    # ------------------------------------------------------------------ state
    def _param(self) -> Tensor:
        return self.downsample.conv.conv.conv.weight

    @_inference
    def init_state(self, batch_size: int, frames_per_chunk: int = 1) -> MimiState:
        """Preallocated streaming state for `batch_size` slots, fed `frames_per_chunk` frames per call."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device, dtype = self._param().device, self._param().dtype
        samples = frames_per_chunk * self.frame_size
        latent_steps = frames_per_chunk * self.config.resample_stride  # steps at the encoder rate
        encoder = EncoderState(
            seanet=self.encoder.init_state(batch_size, samples, device, dtype),
            transformer=self.encoder_transformer.init_state(batch_size, latent_steps, device, dtype),
            downsample=self.downsample.init_state(batch_size, latent_steps, device, dtype),
        )
        decoder = DecoderState(
            upsample=self.upsample.init_state(batch_size, device, dtype),
            transformer=self.decoder_transformer.init_state(batch_size, latent_steps, device, dtype),
            seanet=self.decoder.init_state(batch_size, latent_steps, device, dtype),
        )
        return MimiState(batch_size, frames_per_chunk, encoder, decoder)

    # ------------------------------------------------------------------ streaming
    @_inference
    def encode_step(
        self, frame: Tensor, state: MimiState, validate: bool | None = None, ready: Tensor | None = None
    ) -> Tensor:
        """One frame of audio [B, 1, frame_size] -> codes [B, num_codebooks, 1] (int64).

        ``ready`` [B] bool (None = all): only those slots advance; the others keep every tensor of
        their encoder state as it was, and their codes are meaningless. No host sync.

        ``validate`` controls the NaN/inf check of the samples, which needs the values on the host:
        None (default) checks CPU frames only, since on an accelerator it would block every step
        on a device->host copy (the server validates PCM on the host before it reaches the codec);
        True always checks, False never does. Shapes and dtypes are always checked.
        """
        if validate is None:
            validate = isinstance(frame, Tensor) and frame.device.type == "cpu"
        frame = self._check_audio(frame, exact_frames=1, check_finite=validate)
        self._check_state(state, frame.shape[0], ready)
        return self._codes_from_audio(frame, state.encoder, ready)

    @_inference
    def decode_step(
        self, codes: Tensor, state: MimiState, validate: bool | None = None, ready: Tensor | None = None
    ) -> Tensor:
        """Codes of one frame [B, K, 1] -> audio [B, 1, frame_size] (float32).

        ``ready``: as for ``encode_step``, for the decoder state.

        ``validate``: the range check of the codes, as for ``encode_step`` (None = CPU codes only;
        off an accelerator's hot path because it needs a host sync).
        """
        if validate is None:
            validate = isinstance(codes, Tensor) and codes.device.type == "cpu"
        codes = self._check_codes(codes, exact_frames=1, check_range=validate)
        self._check_state(state, codes.shape[0], ready)
        return self._audio_from_latent(self.quantizer.decode(codes), state.decoder, ready)

    # ------------------------------------------------------------------ offline
    @_inference
    def encode(self, audio: Tensor) -> Tensor:
        """Audio [B, 1, T] -> codes [B, num_codebooks, ceil(T / frame_size)]; the tail is padded with zeros."""
        audio, state = self._offline_audio(audio)
        chunk = state.frames_per_chunk * self.frame_size
        return torch.cat([self._codes_from_audio(part, state.encoder) for part in audio.split(chunk, -1)], -1)

    @_inference
    def encode_latent(self, audio: Tensor) -> Tensor:
        """Audio [B, 1, T] -> unquantized latent [B, dimension, ceil(T / frame_size)] at the frame rate."""
        audio, state = self._offline_audio(audio)
        chunk = state.frames_per_chunk * self.frame_size
        latents = [self._latent_from_audio(part, state.encoder) for part in audio.split(chunk, dim=-1)]
        return torch.cat(latents, dim=1).transpose(1, 2)  # [B, D, S]

    @_inference
    def decode(self, codes: Tensor) -> Tensor:
        """Codes [B, K, S] -> audio [B, 1, S * frame_size] (float32)."""
        return self._decode_offline(self.quantizer.decode(self._check_codes(codes)))

    @_inference
    def dequantize(self, codes: Tensor) -> Tensor:
        """Codes [B, K, S] -> quantized latent [B, dimension, S] (sum of codebook vectors, projected)."""
        return self.quantizer.decode(self._check_codes(codes)).transpose(1, 2)

    @_inference
    def decode_latent(self, latent: Tensor) -> Tensor:
        """Quantized latent [B, dimension, S] -> audio [B, 1, S * frame_size] (float32)."""
        if latent.dim() != 3 or latent.shape[1] != self.config.seanet.dimension or latent.shape[-1] < 1:
            raise ValueError(f"latent must be [B, {self.config.seanet.dimension}, S>=1], got {tuple(latent.shape)}")
        return self._decode_offline(latent.to(self._param()).transpose(1, 2))

    def pack_(self) -> Mimi:
        """Re-lay conv weights in memory for copy-free matrix products (shapes and values unchanged)."""
        for module in self.modules():
            if module is not self and hasattr(module, "pack_"):
                module.pack_()
        return self

    # ------------------------------------------------------------------ internals
    def _offline_chunk(self, frames: int) -> int:
        return max(1, min(frames, int(self.offline_chunk_frames)))

    def _offline_audio(self, audio: Tensor) -> tuple[Tensor, MimiState]:
        """Validated audio padded to whole frames, and a fresh state for offline chunks."""
        audio = self._pad_to_frames(self._check_audio(audio))
        return audio, self.init_state(audio.shape[0], self._offline_chunk(audio.shape[-1] // self.frame_size))

    def _decode_offline(self, latent: Tensor) -> Tensor:
        """Quantized latent [B, S, D] -> audio [B, 1, S * frame_size], through a fresh state."""
        state = self.init_state(latent.shape[0], self._offline_chunk(latent.shape[1]))
        parts = latent.split(state.frames_per_chunk, dim=1)
        return torch.cat([self._audio_from_latent(part, state.decoder) for part in parts], dim=-1)

    def _latent_from_audio(self, audio: Tensor, state: EncoderState, ready: Tensor | None = None) -> Tensor:
        """Audio [B, 1, n * frame_size] -> unquantized latent [B, n, D] (channels-last)."""
        batch, _, samples = audio.shape
        latent = self.encoder(audio.reshape(batch, samples, 1), state.seanet, ready)  # [B, 2n, D] at 25 Hz
        latent = self.encoder_transformer(latent, state.transformer, ready)
        return self.downsample(latent, state.downsample, ready)  # [B, n, D] at 12.5 Hz

    def _codes_from_audio(self, audio: Tensor, state: EncoderState, ready: Tensor | None = None) -> Tensor:
        """Audio [B, 1, n * frame_size] -> codes [B, num_codebooks, n]."""
        latent = self._latent_from_audio(audio, state, ready)
        return self.quantizer.encode(latent, self.num_codebooks).contiguous()

    def _audio_from_latent(self, latent: Tensor, state: DecoderState, ready: Tensor | None = None) -> Tensor:
        """Quantized latent [B, n, D] -> audio [B, 1, n * frame_size] (float32)."""
        latent = self.upsample(latent, state.upsample, ready)  # [B, 2n, D]
        latent = self.decoder_transformer(latent, state.transformer, ready)
        audio = self.decoder(latent, state.seanet, ready)  # [B, n * frame_size, 1]
        return audio.reshape(audio.shape[0], 1, -1).float()

    def _pad_to_frames(self, audio: Tensor) -> Tensor:
        missing = -audio.shape[-1] % self.frame_size
        return torch.nn.functional.pad(audio, (0, missing)) if missing else audio

    def _check_audio(self, audio: Tensor, exact_frames: int | None = None, check_finite: bool = True) -> Tensor:
        """Validate audio [B, 1, T] (float; finite if check_finite) and move it to the model's device and dtype."""
        if not isinstance(audio, Tensor):
            raise ValueError(f"audio must be a torch.Tensor, got {type(audio).__name__}")
        if audio.dim() != 3 or audio.shape[1] != 1 or audio.shape[0] < 1 or audio.shape[-1] < 1:
            raise ValueError(f"audio must have shape [B, 1, T] with B, T >= 1, got {tuple(audio.shape)}")
        if exact_frames is not None and audio.shape[-1] != exact_frames * self.frame_size:
            raise ValueError(
                f"a streaming frame must hold exactly {self.frame_size} samples, got {audio.shape[-1]}"
            )
        if not audio.dtype.is_floating_point:
            raise ValueError(f"audio must be a floating-point tensor, got {audio.dtype}")
        if check_finite:
            finite = torch.isfinite(audio).flatten(1).all(dim=1)  # [B]; bool() below syncs with the host
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                raise ValueError(f"audio contains NaN or infinite samples (batch slots {bad})")
        return audio.to(self._param())

    def _check_codes(self, codes: Tensor, exact_frames: int | None = None, check_range: bool = True) -> Tensor:
        """Validate codes [B, K, S] (integer, K <= total_codebooks, values < cardinality)."""
        if not isinstance(codes, Tensor):
            raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dim() != 3 or codes.shape[0] < 1 or codes.shape[-1] < 1:
            raise ValueError(f"codes must have shape [B, K, S] with B, S >= 1, got {tuple(codes.shape)}")
        if not 1 <= codes.shape[1] <= self.total_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks; expected 1..{self.total_codebooks}")
        if exact_frames is not None and codes.shape[-1] != exact_frames:
            raise ValueError(f"decode_step takes exactly {exact_frames} frame of codes, got {codes.shape[-1]}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if check_range and bool(((codes < 0) | (codes >= self.cardinality)).any()):
            raise ValueError(f"codes must lie in 0..{self.cardinality - 1}")
        return codes.to(device=self._param().device, dtype=torch.long)

    def _check_state(self, state: MimiState, batch_size: int, ready: Tensor | None = None) -> None:
        if not isinstance(state, MimiState):
            raise ValueError(f"state must be a MimiState from init_state(), got {type(state).__name__}")
        if state.batch_size != batch_size:
            raise ValueError(f"state was made for batch size {state.batch_size}, input has {batch_size}")
        if state.frames_per_chunk != 1:
            raise ValueError("encode_step/decode_step need a state from init_state(batch_size) (one frame per call)")
        check_ready(ready, batch_size)
