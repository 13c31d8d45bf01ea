"""LoRA (or full) training of the LM on encoded dialogues: loss, schedule, checkpoints, resume.

Loss (moshi-finetune's): text cross-entropy with padding targets weighted ``text_padding_weight``,
plus the model-voice codebooks' cross-entropy with the first (semantic) codebook weighted
``first_codebook_weight_multiplier``; the user stream is input only. Both terms are weighted means
over the positions the LM's delays leave valid (``LMModel.forward``'s masks).

Checkpoints: ``<out>/checkpoints/step_NNNNNN/`` holds a usable adapter (``lora.safetensors`` +
``config.json``, or ``model.safetensors`` with ``--full``) and ``trainer.pt`` (trainable tensors,
optimizer, schedule, step) from which ``resume`` continues exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .finetune_data import Sample, batch_order, window_batch, windows
from .lm import LMModel, LMOutput
from .lora import LoRAConfig, save_adapter
from .lora_multi import add_lora, lora_pairs

logger = logging.getLogger(__name__)

FRAME_RATE = 12.5  # Mimi frames (LM steps) per second
CHECKPOINTS = "checkpoints"
TRAINER_FILE = "trainer.pt"


@dataclass
class TrainOptions:
    """Training settings (defaults: moshi-finetune's example for Moshi 7B)."""

    out_dir: Path
    rank: int = 128
    scaling: float = 2.0
    full: bool = False
    lr: float = 2e-6
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    max_steps: int = 2000
    batch_size: int = 16
    duration: float = 100.0  # seconds per training window
    max_norm: float = 1.0
    text_padding_weight: float = 0.5
    first_codebook_weight_multiplier: float = 100.0
    gradient_checkpointing: bool = True
    checkpoint_every: int = 100
    seed: int = 0
    progress: bool = True
    base_config: dict = field(default_factory=dict)  # the LM's config.json, copied into the output


@dataclass
class LossTerms:
    total: torch.Tensor
    text: torch.Tensor
    audio: torch.Tensor


def training_loss(out: LMOutput, codes: torch.Tensor, padding_id: int, text_padding_weight: float,
                  first_codebook_weight_multiplier: float) -> LossTerms:
    """codes [B, 1 + n_q, T] and the LM's output on them -> weighted text and audio losses."""
    text_mask = out.text_mask[:, 0]  # [B, T]
    text_targets = codes[:, 0][text_mask]  # [M]
    text_ce = F.cross_entropy(out.text_logits[:, 0][text_mask].float(), text_targets, reduction="none")
    text_weight = torch.where(text_targets == padding_id, text_padding_weight, 1.0)
    text = (text_ce * text_weight).sum() / text_weight.sum().clamp_min(1e-9)
    dep_q = out.logits.shape[1]
    audio_targets = codes[:, 1:1 + dep_q]  # [B, dep_q, T]
    audio_ce = F.cross_entropy(out.logits[out.mask].float(), audio_targets[out.mask], reduction="none")
    per_codebook = torch.ones(dep_q, device=codes.device)
    per_codebook[0] = first_codebook_weight_multiplier
    audio_weight = per_codebook[None, :, None].expand_as(out.mask)[out.mask]  # [M]
    audio = (audio_ce * audio_weight).sum() / audio_weight.sum().clamp_min(1e-9)
    return LossTerms(total=text + audio, text=text, audio=audio)


def enable_gradient_checkpointing(lm: LMModel) -> None:
    """Recompute each transformer layer in the backward pass instead of keeping its activations.

    The layer writes its keys / values into the (throw-away) cache of the training pass; the
    checkpointed function writes into a copy, so that the recomputation sees the same inputs.
    """
    for transformer in (lm.transformer, lm.depformer):
        for layer in transformer.layers:
            original = layer.forward

            def forward(x, ctx, keys, values, _original=original):
                if not torch.is_grad_enabled():
                    return _original(x, ctx, keys, values)
                return checkpoint(lambda inner: _original(inner, ctx, keys.clone(), values.clone()), x,
                                  use_reentrant=False)

            layer.forward = forward


def prepare_model(lm: LMModel, options: TrainOptions) -> list[torch.nn.Parameter]:
    """Freeze the base, add the trainable adapter (or unfreeze everything): the trainable parameters."""
    lm.requires_grad_(False)
    if options.full:
        lm.requires_grad_(True)
    else:
        for layer in add_lora(lm, LoRAConfig(options.rank, options.scaling)).values():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    lm.train()
    return [p for p in lm.parameters() if p.requires_grad]


def lr_factor(step: int, options: TrainOptions) -> float:
    """One-cycle schedule: linear warm-up from lr / 25 to lr, then cosine decay to lr / 250000."""
    warmup = max(1, int(options.warmup_fraction * options.max_steps))
    start, end = 1 / 25, 1 / 25 / 1e4
    if step < warmup:
        return start + (1 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, options.max_steps - warmup))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Runs the optimisation over encoded samples; ``run()`` returns the loss of every step."""

    def __init__(self, lm: LMModel, samples: list[Sample], options: TrainOptions) -> None:
        self.lm = lm
        self.samples = samples
        self.options = options
        self.frames = max(1, round(options.duration * FRAME_RATE))
        self.windows = windows(samples, self.frames)
        self.parameters = prepare_model(lm, options)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.lr, weight_decay=options.weight_decay,
                                           betas=(0.9, 0.95), foreach=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, options))
        self.step = 0
        self.padding_id = lm.config.existing_text_padding_id
        self.device = lm.device

    def train_step(self) -> LossTerms:
        chosen = [self.windows[i] for i in batch_order(len(self.windows), self.options.batch_size, self.step,
                                                       self.options.seed)]
        codes = window_batch(self.samples, chosen, self.frames).to(self.device)  # [B, 1 + n_q, T]
        terms = training_loss(self.lm(codes), codes, self.padding_id, self.options.text_padding_weight,
                              self.options.first_codebook_weight_multiplier)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.options.max_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return terms

    def run(self) -> list[float]:
        from tqdm import tqdm

        losses = []
        bar = tqdm(total=self.options.max_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not self.options.progress)
        while self.step < self.options.max_steps:
            terms = self.train_step()
            losses.append(float(terms.total.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", text=f"{float(terms.text.detach()):.3f}",
                            audio=f"{float(terms.audio.detach()):.3f}",
                            lr=f"{self.schedule.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
            if self.options.checkpoint_every and self.step % self.options.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_output(self.options.out_dir)
        return losses

    # ------------------------------------------------------------------ files
    def save_output(self, folder: Path) -> Path:
        """The usable result: an adapter in upstream's format, or the full weights (``--full``)."""
        if self.options.full:
            import json

            from .loading import save_lm

            folder.mkdir(parents=True, exist_ok=True)
            save_lm(self.lm, folder / "model.safetensors")
            (folder / "config.json").write_text(json.dumps(self.options.base_config, indent=2) + "\n")
            return folder / "model.safetensors"
        return save_adapter(lora_pairs(self.lm), LoRAConfig(self.options.rank, self.options.scaling), folder,
                            self.options.base_config)

    def save_checkpoint(self) -> Path:
        folder = self.options.out_dir / CHECKPOINTS / f"step_{self.step:06d}"
        self.save_output(folder)
        trainable = {name: p.detach().cpu() for name, p in self.lm.named_parameters() if p.requires_grad}
        torch.save({"step": self.step, "trainable": trainable, "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(), "options": _plain(self.options)},
                   folder / TRAINER_FILE)
        logger.info("checkpoint: %s", folder)
        return folder

    def resume(self) -> bool:
        """Continue from the latest checkpoint under out_dir (False when there is none)."""
        latest = latest_checkpoint(self.options.out_dir)
        if latest is None:
            return False
        state = torch.load(latest / TRAINER_FILE, map_location=self.device, weights_only=False)
        parameters = dict(self.lm.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                if name not in parameters:
                    raise ValueError(f"checkpoint {latest} does not fit this run (no parameter {name}): "
                                     "same --rank / --full as the interrupted run?")
                parameters[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])
        logger.info("resumed from %s (step %d)", latest, self.step)
        return True


def latest_checkpoint(out_dir: Path) -> Path | None:
    folders = sorted(p for p in (Path(out_dir) / CHECKPOINTS).glob("step_*") if (p / TRAINER_FILE).is_file())
    return folders[-1] if folders else None


def _plain(options: TrainOptions) -> dict:
    raw = asdict(options)
    raw["out_dir"] = str(raw["out_dir"])
    return raw
