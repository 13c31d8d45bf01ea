"""`duplex serve --demo`: tiny random models built in memory, so every part can be tried with no download.

The LM and the codec have the shapes of the test fixtures (a 2-layer, 64-wide LM; a 32-wide Mimi) and
seeded random weights: the page, the protocol, queueing, batching and metrics all work, and the model
"speaks" noise. The text stream uses :class:`DemoTokenizer` (pieces ``w0a``, ``w1b``, ...), so no
sentencepiece file is needed either.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo (random weights: it speaks noise)"
DEMO_SEED = 1234

_LM_CONFIG = {
    "dim": 64, "text_card": 100, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 64,
    "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 16, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 32, "depformer_dim_feedforward": 132, "depformer_num_heads": 2, "depformer_num_layers": 2,
    "depformer_causal": True, "depformer_layer_scale": None, "depformer_multi_linear": True,
    "depformer_context": 8, "depformer_max_period": 10000, "depformer_gating": "silu",
    "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}
_MIMI_CONFIG = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 32, "causal": True, "n_filters": 4, "n_residual_layers": 1,
               "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
               "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
               "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True},
    "quantizer": {"dimension": 16, "n_q": 16, "bins": 64, "input_dimension": 32, "output_dimension": 32},
    "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 2, "causal": True, "layer_scale": 0.01,
                    "context": 10, "conv_layout": True, "max_period": 10000, "gating": "none",
                    "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 64,
                    "input_dimension": 32, "output_dimensions": [32]},
}


class DemoTokenizer:
    """The text tokenizer interface (``piece``, ``decode``, ``encode``) over made-up words ``w{id}{letter}``."""

    def __init__(self, vocab_size: int = 100) -> None:
        self.vocab_size = vocab_size
        self.padding_ids = frozenset((0, 3))

    def _word(self, token: int) -> str:
        return f"w{token}{chr(97 + token % 26)}"

    def piece(self, token: int) -> str | None:
        token = int(token)
        if token in self.padding_ids or token in (1, 2) or not 0 <= token < self.vocab_size:
            return None
        return " " + self._word(token)

    def decode(self, tokens) -> str:
        return "".join(self.piece(t) or "" for t in tokens).strip()

    def encode(self, text: str) -> list[int]:
        words = {self._word(i): i for i in range(self.vocab_size)}
        return [words.get(word, 0) for word in text.split()]


def build_demo_models(device: str | torch.device = "cpu"):
    """LoadedModels with seeded random tiny weights (no file is read or written)."""
    from duplex.codec.config import MimiConfig
    from duplex.codec.mimi import Mimi
    from duplex.model.config import LMConfig
    from duplex.model.lm import LMModel
    from duplex.bundle import ModelBundle, codebooks_needed, lm_gen_defaults

    device = torch.device(device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(DEMO_SEED)
    try:
        lm_config = LMConfig.from_kyutai(_LM_CONFIG)
        mimi = Mimi(MimiConfig.from_kyutai(_MIMI_CONFIG), num_codebooks=codebooks_needed(lm_config))
        lm = LMModel(lm_config)
    finally:
        torch.random.set_rng_state(generator_state)
    mimi = mimi.to(device=device, dtype=torch.float32).eval()
    lm = lm.to(device=device, dtype=torch.float32).eval()
    logger.info("demo mode: tiny random models built in memory (the model speaks noise)")
    return ModelBundle(mimi=mimi, lm=lm, lm_gen_defaults=lm_gen_defaults({}), tokenizer=DemoTokenizer(),
                        model_name=DEMO_MODEL_NAME, device=device, dtype=torch.float32, config=dict(_LM_CONFIG))
