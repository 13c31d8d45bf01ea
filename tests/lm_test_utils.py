"""Helpers shared by the LM tests: fixture models, tiny random models, generation loops."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import load_file

from duplex.model.config import LMConfig
from duplex.model.generate import LMGen, LMGenState
from duplex.model.lm import LMModel

TINY = LMConfig(
    delays=(0, 0, 1, 2, 0, 1, 1), dim=32, text_card=30, n_q=6, dep_q=3, card=20, num_heads=2, num_layers=2,
    hidden_scale=2, context=5, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
    depformer_dim=16, depformer_num_heads=2, depformer_num_layers=1, depformer_multi_linear=True,
    depformer_gating="silu", depformer_pos_emb="none", depformer_weights_per_step=True)


def fixture_lm(fixtures_dir, name: str) -> tuple[LMModel, dict[str, torch.Tensor]]:
    """A fixture LM in float32 and its reference io tensors."""
    folder = fixtures_dir / name
    config = LMConfig.from_kyutai(folder / "config.json")
    lm = LMModel.from_pretrained(folder / "model.safetensors", config, dtype=torch.float32)
    return lm, load_file(str(folder / "io.safetensors"))


def random_lm(config: LMConfig = TINY, seed: int = 0, **changes) -> LMModel:
    """A tiny LM with random weights (embeddings scaled so that logits are well spread)."""
    torch.manual_seed(seed)
    lm = LMModel(replace(config, **changes) if changes else config).eval()
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if name.endswith("scale"):
                continue
            if param.dim() >= 2:
                param.normal_(0, 1.0 / param.shape[-1] ** 0.5 * (3 if "linear" in name else 1))
    return lm


def random_user_codes(lm: LMModel, batch: int, steps: int, seed: int = 1) -> torch.Tensor:
    """User audio tokens [B, n_q - dep_q, T]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.config.card, (batch, lm.config.num_user_codebooks, steps), generator=gen)


def run(gen: LMGen, state: LMGenState, user_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step through user_codes [B, Ku, T]: -> tokens [B, 1 + dep_q, T], valid [B, T]."""
    tokens, valid = [], []
    for t in range(user_codes.shape[-1]):
        out, ok = gen.step(user_codes[:, :, t:t + 1], state)
        tokens.append(out)
        valid.append(ok)
    return torch.cat(tokens, dim=2), torch.stack(valid, dim=1)


def teacher_forcing_codes(gen: LMGen, tokens: torch.Tensor, user_codes: torch.Tensor) -> torch.Tensor:
    """The codes [B, 1 + n_q, T - max_delay] that a generation run corresponds to.

    Output step s holds frame s - max_delay; user frame s is frame s - 1 of the codes.
    """
    delay = gen.max_delay
    steps = min(tokens.shape[-1] - delay, user_codes.shape[-1] - 1)
    generated = tokens[:, :, delay:delay + steps]  # [B, 1 + dep_q, T']
    user = user_codes[:, :, 1:1 + steps]
    return torch.cat([generated, user], dim=1)


def assert_streaming_equals_forward(lm, user_codes, max_steps: int | None = None):
    """Feeding generated tokens back through lm(codes) gives the same argmaxes."""
    gen = LMGen(lm, use_sampling=False)
    tokens, _ = run(gen, gen.init_state(user_codes.shape[0], max_steps=max_steps), user_codes)
    codes = teacher_forcing_codes(gen, tokens, user_codes)
    with torch.no_grad():
        out = lm(codes)
    dep_q = lm.config.dep_q
    assert out.mask.any() and out.text_mask.all()
    assert torch.equal(out.text_logits.argmax(-1), codes[:, :1])
    predicted = out.logits.argmax(-1)
    assert torch.equal(predicted[out.mask], codes[:, 1:1 + dep_q][out.mask])
