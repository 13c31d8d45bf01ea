"""How far a quantized LM is from its float original: logit error and teacher-forced top-1 agreement."""

from __future__ import annotations

import torch

from .lm import LMModel


@torch.inference_mode()
def compare_logits(reference: LMModel, quantized: LMModel, codes: torch.Tensor) -> dict[str, float]:
    """Teacher-forced pass of both models on codes [B, 1 + n_q, T].

    rel_error: ||q - ref|| / ||ref|| over the valid positions (audio and text logits together);
    top1: fraction of valid positions (audio and text) where both models rank the same token first.
    """
    ref, out = reference(codes), quantized(codes)
    pairs = ((ref.logits, out.logits, ref.mask), (ref.text_logits, out.text_logits, ref.text_mask))
    diff = norm = 0.0
    agree = total = 0
    for ref_logits, q_logits, mask in pairs:
        r, q = ref_logits[mask].float(), q_logits[mask].float()  # [P, V]
        diff += float(((q - r) ** 2).sum())
        norm += float((r ** 2).sum())
        agree += int((q.argmax(-1) == r.argmax(-1)).sum())
        total += r.shape[0]
    return {"rel_error": (diff / norm) ** 0.5, "top1": agree / total}


def random_codes(lm: LMModel, batch: int, steps: int, seed: int = 0) -> torch.Tensor:
    """Random teacher-forcing codes [B, 1 + n_q, T] (text tokens below text_card, audio below card)."""
    gen = torch.Generator().manual_seed(seed)
    config = lm.config
    codes = torch.randint(0, config.card, (batch, config.num_codebooks, steps), generator=gen)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, steps), generator=gen)
    return codes.to(lm.device)
